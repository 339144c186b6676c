"""Pairing (rest.md "E2EE devices, books, pairing, relay"; realtime.md "Book relay"): generate,
verify, exchange and the ``pairing.matched`` push, on every code-store backend (the SQL store on
SQLite and on PostgreSQL, the Redis store with PostgreSQL), written from the contract: real
servers, real sockets, real databases and Redis.

Also: single use under concurrent verifications, expiry, wrong and malformed codes, the guess
limits (per device and per IP, counted before a code is evaluated, so even a concurrent burst
evaluates no more guesses than the limit), the generation limit, re-joining after removal, two
nodes (the generator's socket on one, the verifier's REST call on the other), and what is stored
(digests, never codes; hashed ids in the audit log)."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from relay.device_notices import parse
from relay.server import RunningServer
from shared.config import Settings
from shared.pairing import PairingRecord, code_key, digest
from shared.pairing.redis import RedisCodeStore
from shared.pairing.sql import SqlCodeStore
from shared.secrets import hash_id
from shared.store import open_database
from tests.conftest import PG_URL, REDIS_URL
from tests.device_helpers import DeviceKey, insert_book, insert_device
from tests.test_book_relay import Peer, open_peer
from tests.test_ws_handshake import refused

ISO_SECONDS = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$")
KINDS = ["sqlite", "postgresql", "redis"]  # the code store: SQL on SQLite / PostgreSQL, or Redis
TIMEOUT = 10.0
# Requests in flight at once: a real burst, under the server's MAX_HANDSHAKES_PER_IP (64).
IN_FLIGHT = 32


def client_session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=IN_FLIGHT))


# -- a REST client written from the contract ----------------------------------------------------------


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: dict[str, Any]

    @property
    def data(self) -> Any:
        assert self.status < 300 and self.body["success"] is True, (self.status, self.body)
        return self.body["data"]

    def error(self, status: int, code: str) -> dict[str, Any]:
        assert self.status == status and self.body["success"] is False, (self.status, self.body)
        assert self.body["error"]["code"] == code, self.body
        return dict(self.body["error"])


class Api:
    def __init__(self, server: RunningServer, session: aiohttp.ClientSession) -> None:
        self.server = server
        self.session = session

    @property
    def db(self) -> Any:
        return self.server.services.db

    async def call(self, path: str, key: DeviceKey | None = None, body: Any = None,
                   token: str | None = None) -> Reply:
        headers = {}
        if token is None and key is not None:
            token = key.token()
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        url = f"http://127.0.0.1:{self.server.port}/api/v1{path}"
        async with self.session.post(url, json=body, headers=headers) as resp:
            return Reply(resp.status, dict(resp.headers), await resp.json())

    async def register(self, key: DeviceKey | None = None) -> DeviceKey:
        key = key or DeviceKey()
        reply = await self.call("/devices/register", body=key.register_body())
        key.device_id = reply.data["device_id"]
        return key

    async def book(self, key: DeviceKey) -> str:
        reply = await self.call("/books", key)
        assert reply.status == 201
        return str(reply.data["book_id"])

    async def generate(self, key: DeviceKey, book_id: str) -> dict[str, Any]:
        reply = await self.call("/pairing/generate", key, {"book_id": book_id})
        assert reply.status == 201, reply
        return dict(reply.data)

    async def verify(self, key: DeviceKey, code: Any, public_key: str | None = None,
                     token: str | None = None) -> Reply:
        body = {"short_code": code, "public_key": public_key or key.public_b64}
        return await self.call("/pairing/verify", key, body, token=token)

    async def exchange(self, key: DeviceKey, code: Any, token: str | None = None) -> Reply:
        return await self.call("/pairing/exchange", key, {"short_code": code}, token=token)


def settings_for(kind: str, make_settings: Callable[..., Settings], pg_schema: str, redis_prefix: str,
                 **overrides: Any) -> Settings:
    if kind == "sqlite":
        return make_settings(**overrides)
    if kind == "postgresql":
        return make_settings(database_url=PG_URL, database_schema=pg_schema, **overrides)
    return make_settings(database_url=PG_URL, database_schema=pg_schema, redis_url=REDIS_URL,
                         redis_prefix=redis_prefix, **overrides)


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


ApiFactory = Callable[..., Awaitable[Api]]


@pytest.fixture
async def start(kind: str, pg_schema: str, redis_prefix: str, server_factory: Any,
                make_settings: Callable[..., Settings]) -> AsyncIterator[ApiFactory]:
    # The schema and the prefix are set up first so they are torn down last, after the servers.
    """``await start(**settings_overrides)``: a real server on this kind's backends, and a client."""
    sessions: list[aiohttp.ClientSession] = []

    async def make(**overrides: Any) -> Api:
        server = await server_factory(settings_for(kind, make_settings, pg_schema, redis_prefix, **overrides))
        session = client_session()
        sessions.append(session)
        return Api(server, session)

    yield make
    for session in sessions:
        await session.close()


@pytest.fixture
async def api(start: ApiFactory) -> Api:
    return await start()


async def member(api: Api, book_id: str, key: DeviceKey) -> bool:
    row = await api.db.fetchrow("SELECT removed_at FROM book_members WHERE book_id = $1 AND device_id = $2",
                                book_id, key.device_id)
    return row is not None and row["removed_at"] is None


async def set_record(api: Api, code: str, **fields: int) -> None:
    """Move a stored record's times (the test's clock): in the table, or in the Redis hash."""
    services = api.server.services
    hashed = digest(code_key(services.jwt_key), code)
    settings = services.settings
    if settings.redis_url:
        client = aioredis.from_url(settings.redis_url)
        try:
            assert await client.exists(f"{settings.redis_prefix}pairing:{hashed}")
            await client.hset(f"{settings.redis_prefix}pairing:{hashed}", mapping=fields)
        finally:
            await client.aclose()
        return
    for name, value in fields.items():
        assert name in ("expires_at", "keep_until")
        assert await api.db.execute(f"UPDATE pairing_codes SET {name} = $1 WHERE code_hash = $2", value, hashed) == 1


def wrong_codes(right: str, count: int) -> list[str]:
    return [c for c in (f"{i:06d}" for i in range(count + 1)) if c != right][:count]


async def audit_rows(api: Api, event_prefix: str = "pairing.") -> list[Any]:
    return list(await api.db.fetch(
        "SELECT event, subject_hash, ip_hash, details FROM audit_log WHERE event LIKE $1 ORDER BY id",
        event_prefix + "%",
    ))


# -- end to end ----------------------------------------------------------------------------------------


async def test_a_generates_b_verifies_both_learn_the_other_key_and_b_joins(api: Api) -> None:
    a = await api.register()
    book = await api.book(a)
    a_socket = await open_peer(api.server, a, book)

    before = int(time.time())
    generated = await api.generate(a, book)
    assert set(generated) == {"short_code", "expires_at", "ttl_seconds"}
    code = generated["short_code"]
    assert re.fullmatch(r"[0-9]{6}", code) and generated["ttl_seconds"] == 300
    assert ISO_SECONDS.match(generated["expires_at"]), generated
    expires = datetime.strptime(generated["expires_at"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()
    assert before + 300 <= expires <= int(time.time()) + 301

    assert (await api.exchange(a, code)).data == {"status": "pending"}

    b = await api.register()
    reply = await api.verify(b, code)
    assert reply.status == 200
    assert reply.data == {"matched": True, "peer_public_key": a.public_b64, "book_id": book}
    assert await member(api, book, b)

    # A learns B's key twice: pushed on its open relay socket, and asked through exchange.
    frame = await a_socket.until(lambda f: f["type"] == "pairing.matched")
    assert frame == {"type": "pairing.matched", "device_id": b.device_id, "public_key": b.public_b64}
    assert (await api.exchange(a, code)).data == {
        "status": "matched", "peer_device_id": b.device_id, "peer_public_key": b.public_b64,
    }

    # B is a member now: its relay socket opens (101) and A sees it come online.
    b_socket = await open_peer(api.server, b, book)
    assert set(b_socket.frames[0]["online"]) == {a.device_id, b.device_id}
    await a_socket.until(lambda f: f == {"type": "device.online", "device_id": b.device_id})
    # ... and nothing else: another book stays closed to it, and the code is used up.
    other_book = await api.book(await api.register())
    status, _, error = await refused(api.server, f"/ws/relay/{other_book}", {"Authorization": f"Bearer {b.token()}"})
    assert (status, error["code"]) == (403, "FORBIDDEN")
    (await api.verify(b, code)).error(400, "INVALID_SHORT_CODE")
    (await api.verify(await api.register(), code)).error(400, "INVALID_SHORT_CODE")
    (await api.call("/pairing/generate", b, {"book_id": other_book})).error(403, "FORBIDDEN")
    await a_socket.ws.close()
    await b_socket.ws.close()


async def test_the_code_is_stored_as_a_digest_and_the_audit_log_holds_only_hashes(api: Api) -> None:
    a, b = await api.register(), await api.register()
    book = await api.book(a)
    code = (await api.generate(a, book))["short_code"]
    (await api.verify(b, wrong_codes(code, 1)[0])).error(400, "INVALID_SHORT_CODE")
    assert (await api.verify(b, code)).status == 200
    assert (await api.exchange(a, code)).data["status"] == "matched"

    settings = api.server.services.settings
    hashed = digest(code_key(api.server.services.jwt_key), code)
    if settings.redis_url:
        client = aioredis.from_url(settings.redis_url)
        try:
            keys = [k.decode() async for k in client.scan_iter(match=settings.redis_prefix + "*")]
            assert f"{settings.redis_prefix}pairing:{hashed}" in keys
            stored = await client.hgetall(f"{settings.redis_prefix}pairing:{hashed}")
        finally:
            await client.aclose()
        assert not [k for k in keys if code in k]
        assert code.encode() not in b"".join(stored.values())
    else:
        rows = await api.db.fetch("SELECT * FROM pairing_codes")
        assert [r["code_hash"] for r in rows] == [hashed]
        assert code not in json.dumps([dict(r) for r in rows], default=str)

    rows = await audit_rows(api)
    assert [r["event"] for r in rows] == [
        "pairing.generated", "pairing.verify_failed", "pairing.verified", "pairing.exchanged",
    ]
    raw = {a.device_id, b.device_id, book, code, "127.0.0.1"}
    for row in rows:
        text = json.dumps(dict(row), default=str)
        assert not [value for value in raw if value and value in text], text
    assert [r["subject_hash"] for r in rows] == [hash_id(x) for x in (a.device_id, b.device_id, b.device_id, a.device_id)]  # type: ignore[arg-type]
    assert json.loads(rows[2]["details"]) == {"book": hash_id(book), "peer": hash_id(a.device_id), "joined": "new"}  # type: ignore[arg-type]
    assert json.loads(rows[1]["details"]) == {"reason": "unknown"}


async def test_pairing_matched_goes_only_to_the_generators_sockets_of_that_book(api: Api) -> None:
    a, b, c = await api.register(), await api.register(), await api.register()
    book1, book2 = await api.book(a), await api.book(a)
    a1 = await open_peer(api.server, a, book1)
    a2 = await open_peer(api.server, a, book2)
    a1_again = await open_peer(api.server, a, book1)  # every socket of the device on the book
    code1 = (await api.generate(a, book1))["short_code"]
    assert (await api.verify(b, code1)).status == 200
    expected1 = {"type": "pairing.matched", "device_id": b.device_id, "public_key": b.public_b64}
    for sock in (a1, a1_again):
        assert await sock.until(lambda f: f["type"] == "pairing.matched") == expected1
    # Book 2's socket got nothing for book 1: the next pairing frame it sees is its own book's.
    code2 = (await api.generate(a, book2))["short_code"]
    assert (await api.verify(c, code2)).status == 200
    frame = await a2.until(lambda f: f["type"] == "pairing.matched")
    assert frame == {"type": "pairing.matched", "device_id": c.device_id, "public_key": c.public_b64}
    assert [f for f in a2.frames if f["type"] == "pairing.matched"] == [frame]
    for sock in (a1, a2, a1_again):
        await sock.ws.close()


async def test_two_concurrent_verifications_of_one_code_exactly_one_wins(api: Api) -> None:
    a = await api.register()
    book = await api.book(a)
    for _ in range(3):
        code = (await api.generate(a, book))["short_code"]
        rivals = [await api.register() for _ in range(6)]
        replies = await asyncio.gather(*(api.verify(r, code) for r in rivals))
        winners = [r for r, reply in zip(rivals, replies, strict=True) if reply.status == 200]
        assert len(winners) == 1, [(x.status, x.body) for x in replies]
        for reply in replies:
            if reply.status != 200:
                reply.error(400, "INVALID_SHORT_CODE")
        assert [await member(api, book, r) for r in rivals].count(True) == 1
        assert await member(api, book, winners[0])
        assert (await api.exchange(a, code)).data["peer_device_id"] == winners[0].device_id


# -- codes that do not pair --------------------------------------------------------------------------------


async def test_expired_code_answers_short_code_expired_then_unknown_after_five_minutes(api: Api) -> None:
    a, b = await api.register(), await api.register()
    book = await api.book(a)
    generated = await api.generate(a, book)
    code = generated["short_code"]
    now = int(time.time() * 1000)
    await set_record(api, code, expires_at=now - 1000)
    error = (await api.verify(b, code)).error(400, "SHORT_CODE_EXPIRED")
    assert ISO_SECONDS.match(error["details"]["expiry"])
    assert not await member(api, book, b)
    assert (await api.exchange(a, code)).data == {"status": "expired"}
    # Five minutes after the expiry the record is gone: the code is simply unknown.
    await set_record(api, code, keep_until=now - 1)
    (await api.verify(b, code)).error(400, "INVALID_SHORT_CODE")
    (await api.exchange(a, code)).error(400, "INVALID_SHORT_CODE")


async def test_a_short_pairing_ttl_expires_the_code_on_its_own(start: ApiFactory) -> None:
    api = await start(pairing_ttl_s=1)
    a, b = await api.register(), await api.register()
    book = await api.book(a)
    generated = await api.generate(a, book)
    assert generated["ttl_seconds"] == 1
    deadline = time.monotonic() + TIMEOUT
    while (await api.exchange(a, generated["short_code"])).data["status"] == "pending":
        assert time.monotonic() < deadline, "the code never expired"
        await asyncio.sleep(0.1)
    assert (await api.exchange(a, generated["short_code"])).data == {"status": "expired"}
    (await api.verify(b, generated["short_code"])).error(400, "SHORT_CODE_EXPIRED")


async def test_wrong_malformed_and_own_codes(api: Api) -> None:
    a, b = await api.register(), await api.register()
    book = await api.book(a)
    code = (await api.generate(a, book))["short_code"]
    for bad in ["12345", "1234567", "abcdef", " " + code, code + "\n", "١٢٣٤٥٦", "", wrong_codes(code, 1)[0]]:
        (await api.verify(b, bad)).error(400, "INVALID_SHORT_CODE")
    # Wrong JSON types are validation errors, not guesses.
    error = (await api.verify(b, int(code))).error(400, "VALIDATION_ERROR")
    assert error["details"]["field"] == "short_code"
    # The generator cannot verify its own code, and that does not use it up.
    (await api.verify(a, code)).error(400, "INVALID_SHORT_CODE")
    assert (await api.exchange(a, code)).data == {"status": "pending"}
    assert (await api.verify(b, code)).status == 200


async def test_a_public_key_that_is_not_the_callers_is_a_validation_error_not_a_guess(api: Api) -> None:
    a, b = await api.register(), await api.register()
    book = await api.book(a)
    code = (await api.generate(a, book))["short_code"]
    for public_key in [a.public_b64, DeviceKey().public_b64, "not a key"]:
        for _ in range(6):  # more than the per-device guess limit, all together
            error = (await api.verify(b, code, public_key=public_key)).error(400, "VALIDATION_ERROR")
            assert error["details"]["field"] == "public_key"
    assert not await member(api, book, b)
    assert (await api.verify(b, code)).status == 200


async def test_exchange_only_answers_the_generating_device(api: Api) -> None:
    a, b, c = await api.register(), await api.register(), await api.register()
    book = await api.book(a)
    code = (await api.generate(a, book))["short_code"]
    # Someone else's code answers exactly like a code that does not exist: no oracle for guessers.
    unknown = (await api.exchange(c, wrong_codes(code, 1)[0])).error(400, "INVALID_SHORT_CODE")
    assert (await api.exchange(c, code)).error(400, "INVALID_SHORT_CODE") == unknown
    (await api.exchange(a, "12ab")).error(400, "INVALID_SHORT_CODE")
    assert (await api.verify(b, code)).status == 200
    (await api.exchange(b, code)).error(400, "INVALID_SHORT_CODE")  # the verifier is not the generator
    assert (await api.exchange(a, code)).data["status"] == "matched"
    # A generator that was removed from the book meanwhile learns nothing more.
    await api.db.execute("UPDATE book_members SET removed_at = 1 WHERE book_id = $1 AND device_id = $2", book, a.device_id)
    (await api.exchange(a, code)).error(403, "FORBIDDEN")


async def test_who_may_generate_and_verify(api: Api) -> None:
    a, b, outsider = await api.register(), await api.register(), await api.register()
    book, other = await api.book(a), await api.book(b)
    (await api.call("/pairing/generate", body={"book_id": book})).error(401, "INVALID_TOKEN")
    (await api.call("/pairing/generate", outsider, {"book_id": book})).error(403, "FORBIDDEN")
    (await api.call("/pairing/generate", outsider, {"book_id": "no-such-book"})).error(403, "FORBIDDEN")
    (await api.call("/pairing/generate", a, {"book_id": book}, token=a.token(other))).error(403, "FORBIDDEN")
    (await api.call("/pairing/generate", a, {})).error(400, "VALIDATION_ERROR")
    code = (await api.call("/pairing/generate", a, {"book_id": book}, token=a.token(book))).data["short_code"]
    (await api.call("/pairing/verify", body={"short_code": code, "public_key": outsider.public_b64})).error(401, "INVALID_TOKEN")
    # A token bound to another book cannot join this one; the code stays usable.
    (await api.verify(outsider, code, token=outsider.token("some-other-book"))).error(403, "FORBIDDEN")
    bound = await api.verify(outsider, code, token=outsider.token(book))  # bound to this very book: fine
    assert bound.data["book_id"] == book
    assert await member(api, book, outsider)


async def test_a_removed_device_rejoins_by_pairing_but_not_through_a_removed_generator(api: Api) -> None:
    a, b, c = await api.register(), await api.register(), await api.register()
    book = await api.book(a)
    assert (await api.verify(b, (await api.generate(a, book))["short_code"])).status == 200
    await api.db.execute("UPDATE book_members SET removed_at = $1 WHERE book_id = $2 AND device_id = $3",
                         int(time.time() * 1000), book, b.device_id)
    assert not await member(api, book, b)
    # Found again: the family pairs it again, the same membership row comes back.
    assert (await api.verify(b, (await api.generate(a, book))["short_code"])).status == 200
    assert await member(api, book, b)
    assert await api.db.fetchval("SELECT COUNT(*) FROM book_members WHERE book_id = $1 AND device_id = $2",
                                 book, b.device_id) == 1
    verified = [json.loads(r["details"]) for r in await audit_rows(api, "pairing.verified")]
    assert [d["joined"] for d in verified] == ["new", "rejoined"]
    # A current member verifying again stays a member.
    assert (await api.verify(b, (await api.generate(a, book))["short_code"])).status == 200
    # A code whose generator was removed from the book since admits nobody.
    code = (await api.generate(b, book))["short_code"]
    await api.db.execute("UPDATE book_members SET removed_at = 1 WHERE book_id = $1 AND device_id = $2", book, b.device_id)
    (await api.verify(c, code)).error(400, "INVALID_SHORT_CODE")
    assert not await member(api, book, c)


async def test_a_join_that_fails_in_the_database_leaves_the_code_usable(api: Api) -> None:
    a, b, c = await api.register(), await api.register(), await api.register()
    book = await api.book(a)
    code = (await api.generate(a, book))["short_code"]
    # A real failure, from the database itself: a trigger refuses B's membership row.
    if api.db.dialect == "sqlite":
        await api.db.execute(
            "CREATE TRIGGER refuse_b BEFORE INSERT ON book_members"
            f" WHEN NEW.device_id = '{b.device_id}' BEGIN SELECT RAISE(ABORT, 'refused'); END"
        )
    else:
        await api.db.execute(
            "CREATE FUNCTION refuse_b() RETURNS trigger LANGUAGE plpgsql AS $f$ BEGIN"
            f" IF NEW.device_id = '{b.device_id}' THEN RAISE EXCEPTION 'refused'; END IF;"
            " RETURN NEW; END $f$"
        )
        await api.db.execute(
            "CREATE TRIGGER refuse_b BEFORE INSERT ON book_members FOR EACH ROW EXECUTE FUNCTION refuse_b()"
        )
    (await api.verify(b, code)).error(500, "DATABASE_ERROR")
    assert not await member(api, book, b)
    # The match was undone with the join (rolled back with it, or given back to Redis).
    assert (await api.exchange(a, code)).data == {"status": "pending"}
    assert not await audit_rows(api, "pairing.verified")
    assert (await api.verify(c, code)).data["book_id"] == book
    assert (await api.exchange(a, code)).data["peer_device_id"] == c.device_id


def test_device_notices_that_are_not_well_formed_are_dropped() -> None:
    good = {"device_id": "d", "book": "b", "frame": {"type": "pairing.matched"}}
    assert parse(json.dumps(good).encode()) == ("d", "b", {"type": "pairing.matched"})
    for bad in [b"not json", b"[]", json.dumps({**good, "frame": "x"}).encode(),
                json.dumps({**good, "frame": {"no": "type"}}).encode(),
                json.dumps({**good, "device_id": 1}).encode(), json.dumps({"frame": good["frame"]}).encode()]:
        assert parse(bad) is None


# -- limits ----------------------------------------------------------------------------------------------


def assert_limited(reply: Reply, limit: int) -> None:
    reply.error(429, "RATE_LIMIT_EXCEEDED")
    assert reply.headers["X-RateLimit-Limit"] == str(limit)
    assert reply.headers["X-RateLimit-Remaining"] == "0"
    assert int(reply.headers["X-RateLimit-Reset"]) >= int(time.time())
    assert int(reply.headers["Retry-After"]) >= 1


async def test_200_guesses_from_one_device_evaluate_at_most_ten(api: Api) -> None:
    a, guesser, other = await api.register(), await api.register(), await api.register()
    book = await api.book(a)
    code = (await api.generate(a, book))["short_code"]
    # All at once: the attempt is counted before the code is looked at, so a burst gains nothing.
    replies = await asyncio.gather(*(api.verify(guesser, c) for c in wrong_codes(code, 200)))
    evaluated = [r for r in replies if r.status == 400]
    for reply in evaluated:
        reply.error(400, "INVALID_SHORT_CODE")
    assert len(evaluated) == 10
    for reply in replies:
        if reply.status != 400:
            assert_limited(reply, 10)
    failed = await audit_rows(api, "pairing.verify_failed")
    assert [r["subject_hash"] for r in failed] == [hash_id(guesser.device_id)] * 10  # type: ignore[arg-type]
    # Locked out: even the right code answers 429, and is not used up by it.
    assert_limited(await api.verify(guesser, code), 10)
    assert not await member(api, book, guesser)
    assert (await api.verify(other, code)).status == 200


async def test_200_guesses_from_one_address_over_many_devices_evaluate_at_most_thirty(api: Api) -> None:
    a = await api.register()
    book = await api.book(a)
    code = (await api.generate(a, book))["short_code"]
    guessers = [await insert_device(api.db) for _ in range(40)]  # 5 each: under the device limit
    guesses = wrong_codes(code, 200)
    replies = await asyncio.gather(*(api.verify(guessers[i % 40], c) for i, c in enumerate(guesses)))
    evaluated = [r for r in replies if r.status == 400]
    assert len(evaluated) == 30
    for reply in replies:
        if reply.status != 400:
            assert_limited(reply, 30)
    assert len(await audit_rows(api, "pairing.verify_failed")) == 30
    # A fresh device from the same address, with the right code: still 429.
    fresh = await insert_device(api.db)
    assert_limited(await api.verify(fresh, code), 30)
    assert (await api.exchange(a, code)).data == {"status": "pending"}


async def test_ten_codes_per_device_per_hour(api: Api) -> None:
    a, b = await api.register(), await api.register()
    book = await api.book(a)
    codes = [(await api.generate(a, book))["short_code"] for _ in range(10)]
    assert len(set(codes)) == 10
    assert_limited(await api.call("/pairing/generate", a, {"book_id": book}), 10)
    for code in codes:  # every one of them is live
        assert (await api.exchange(a, code)).data == {"status": "pending"}
    # The limit is the device's: another member of the book still generates.
    assert (await api.verify(b, codes[0])).status == 200
    assert (await api.call("/pairing/generate", b, {"book_id": book})).status == 201


# -- two nodes -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("redis_kind", ["standalone", "cluster"])
async def test_two_nodes_the_push_reaches_the_generator_on_the_other_node(
    pg_schema: str, redis_prefix: str, server_factory: Any, make_settings: Callable[..., Settings],
    redis_kind: str, request: pytest.FixtureRequest,
) -> None:
    url, cluster = REDIS_URL, False
    if redis_kind == "cluster":
        url, cluster = request.getfixturevalue("redis_cluster").url, True

    # One deployment: the nodes share the server secret (JWT_SECRET), which keys the code digests.
    settings = make_settings(database_url=PG_URL, database_schema=pg_schema, redis_url=url,
                             redis_prefix=redis_prefix, redis_cluster=cluster)
    async with client_session() as session:
        node1 = Api(await server_factory(settings), session)
        node2 = Api(await server_factory(settings), session)
        a, b = await node1.register(), await node2.register()
        book = await node1.book(a)
        a_socket: Peer = await open_peer(node1.server, a, book)
        code = (await node1.generate(a, book))["short_code"]
        assert (await node2.exchange(a, code)).data == {"status": "pending"}  # one store
        reply = await node2.verify(b, code)
        assert reply.data == {"matched": True, "peer_public_key": a.public_b64, "book_id": book}
        frame = await a_socket.until(lambda f: f["type"] == "pairing.matched")
        assert frame == {"type": "pairing.matched", "device_id": b.device_id, "public_key": b.public_b64}
        assert (await node1.exchange(a, code)).data["status"] == "matched"
        (await node1.verify(await node1.register(), code)).error(400, "INVALID_SHORT_CODE")
        b_socket = await open_peer(node1.server, b, book)
        await b_socket.ws.close()
        await a_socket.ws.close()


# -- the code stores themselves ------------------------------------------------------------------------------


@pytest.fixture
async def store(kind: str, tmp_path: Any, pg_schema: str, redis_prefix: str) -> AsyncIterator[Any]:
    """A code store of this kind, over a database with a book (``store.book``, ``store.devices``)."""
    url = f"sqlite:///{tmp_path / 'store.db'}" if kind == "sqlite" else PG_URL
    db = await open_database(url, schema="" if kind == "sqlite" else pg_schema)
    key = code_key(b"server secret")
    codes: Any = (RedisCodeStore(REDIS_URL, key, prefix=redis_prefix) if kind == "redis"
                  else SqlCodeStore(db, key))
    devices = [await insert_device(db) for _ in range(3)]
    codes.book = await insert_book(db, devices[0])
    codes.devices = [d.device_id for d in devices]
    codes.db = db
    yield codes
    await codes.close()
    await db.close()


def record(book: str, device: str, ttl_ms: int = 300_000) -> PairingRecord:
    now = int(time.time() * 1000)
    return PairingRecord(book_id=book, device_id=device, created_at=now, expires_at=now + ttl_ms,
                         keep_until=now + ttl_ms + 300_000)


async def test_store_a_code_is_held_once_and_claimed_once(store: Any) -> None:
    gen, peer, rival = store.devices
    rec = record(store.book, gen)
    assert await store.create("123456", rec)
    assert not await store.create("123456", record(store.book, peer))  # held: refused, unchanged
    assert await store.get("123456") == rec
    assert await store.get("654321") is None
    now = int(time.time() * 1000)
    # Concurrent claims: one swap from pending.
    results = await asyncio.gather(*(store.mark_matched("123456", d, now) for d in [peer, rival] * 5))
    assert results.count(True) == 1
    got = await store.get("123456")
    assert got.state == "matched" and got.matched_at == now and got.keep_until == now + 300_000
    winner = got.peer_device_id
    assert winner in (peer, rival)
    # Undo only by the winner (a join that failed), back to the pending record.
    await store.unmark("123456", rival if winner == peer else peer, rec)
    assert (await store.get("123456")).state == "matched"
    await store.unmark("123456", winner, rec)
    assert await store.get("123456") == rec
    assert await store.mark_matched("123456", rival, now)


async def test_store_an_old_record_frees_its_code(store: Any) -> None:
    gen = store.devices[0]
    if isinstance(store, SqlCodeStore):
        assert await store.create("000001", record(store.book, gen))
        await store.db.execute("UPDATE pairing_codes SET keep_until = 1")  # past its five minutes
    else:
        # Expired and past its five minutes already: Redis drops the key by itself (1 ms TTL).
        assert await store.create("000001", record(store.book, gen, ttl_ms=-600_000))
        deadline = time.monotonic() + TIMEOUT
        while await store.get("000001") is not None:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
    assert await store.create("000001", record(store.book, gen))
    assert (await store.get("000001")).state == "pending"
