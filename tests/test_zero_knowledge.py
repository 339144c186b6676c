"""Zero-knowledge, proven (issue 5; seed section 4.1: "the server never touches plaintext").

Three simulated Home Pocket devices (``tests.hp_devices``) edit one book's Yjs document: A and B
(msgpack codec) on node 1, C on node 2, the two nodes sharing Redis and the store. A makes the book
key and seals it to B and C through the relay; every edit goes out as a SecretBox-encrypted update.
Once the three documents converge, everything the server side holds or said is scanned:

* every table and column of the store (PostgreSQL: the test's own schema; SQLite: the file, read
  table by table) and every file under DATA_DIR (the SQLite file and its WAL, the blob store
  directory, generated secrets);
* every Redis key (names everywhere, values under the test's prefix, all types), every pub/sub
  message on the prefix (PSUBSCRIBE while the test runs) and every command Redis was sent for the
  prefix (MONITOR: scripts' arguments, ``PUBLISH`` bodies, limiter keys);
* every log record at DEBUG (any logger but the devices' own client sockets) as the JSON handler
  writes it (after ``RedactingFilter``) and as it reached the logger, and the process's
  stdout/stderr; there no op payload may appear either (bodies are never logged), not even its
  first 12 bytes.

What must never appear, in raw bytes or after decoding any base64/base64url/hex run in them: the
plaintext marker and the raw book key. What must never appear in logs, audit entries or Redis key
names, values and channel names: a raw device id or book id (with or without dashes, or its 16
bytes); only ``hash_id`` digests. Pub/sub message bodies may carry the sender's device id (the
relayed frame names it, realtime.md), never the book id. The store necessarily keys rows by ids;
only its ``audit_log`` is held to the id rule.

Each scan also shows it is live (the ciphertexts the devices sent are seen in pub/sub and in the
MONITOR stream, the device ids are found in the ``devices`` table, log lines were captured), so an
empty capture cannot pass for a clean one. ``test_the_scan_finds_every_form_of_a_leak`` checks the
scanner itself on planted leaks.

B and C join by pairing through the API; the book key travels sealed through the relay; the ops
are retained (BOOK_RETENTION's default) so the store holds their ciphertext; an encrypted photo
and an encrypted snapshot go through the blob store, and the scan reads all of it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import codecs
import contextlib
import copy
import json
import logging
import re
import sqlite3
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import asyncpg
import msgpack
import pytest
import redis.asyncio as aioredis

from shared.blobs.local import LocalBlobStore
from shared.config import Settings
from shared.logs import JsonFormatter, RedactingFilter
from shared.secrets import hash_id
from tests.conftest import wait_for
from tests.hp_devices import CLIENT_LOGGER, HPDevice

ROUNDS = 4  # edits per device, sent while the other devices edit too
DECODE_DEPTH = 2  # base64 inside base64 (a JWT in a JSON string, an envelope in a field)
B64_RUN = re.compile(rb"[A-Za-z0-9+/_-]{12,}={0,2}")
HEX_RUN = re.compile(rb"(?:[0-9a-fA-F]{2}){8,}")


# -- the scanner --------------------------------------------------------------------------------------


def _b64_decodings(run: bytes) -> Iterator[bytes]:
    """``run`` decoded as base64 and base64url, from each of the 4 alignments (a run may start
    with a word that is not part of the encoding)."""
    body = run.rstrip(b"=")
    for start in range(4):
        part = body[start:]
        if len(part) % 4 == 1:
            part = part[:-1]
        if len(part) < 8:
            continue
        padded = part + b"=" * (-len(part) % 4)
        for altchars in (b"+/", b"-_"):
            try:
                yield base64.b64decode(padded, altchars=altchars, validate=False)
            except (binascii.Error, ValueError):
                continue


def views(data: bytes, depth: int = DECODE_DEPTH) -> Iterator[bytes]:
    """``data`` itself, then its backslash escapes and every base64 / hex run in it decoded
    (recursively, ``depth`` deep)."""
    yield data
    if depth == 0:
        return
    for match in B64_RUN.finditer(data):
        for decoded in _b64_decodings(match.group()):
            yield from views(decoded, depth - 1)
    if b"\\x" in data:  # Python bytes reprs, Redis MONITOR quoting
        with contextlib.suppress(ValueError):
            yield from views(codecs.escape_decode(data)[0], depth - 1)
    for match in HEX_RUN.finditer(data):
        for start in (0, 1):
            run = match.group()[start:]
            run = run[: len(run) - len(run) % 2]
            if len(run) >= 16:
                yield from views(binascii.unhexlify(run), depth - 1)


@dataclass(frozen=True)
class Finding:
    where: str
    what: str

    def __str__(self) -> str:
        return f"{self.what} in {self.where}"


@dataclass
class Needles:
    """What must not be found: ``secrets`` anywhere, ``ids`` where ids must be hashed."""

    secrets: dict[str, bytes] = field(default_factory=dict)
    ids: dict[str, list[bytes]] = field(default_factory=dict)

    def add_id(self, label: str, value: str) -> None:
        forms = [value.lower().encode()]
        with contextlib.suppress(ValueError):
            parsed = uuid.UUID(value)
            forms += [parsed.hex.encode(), parsed.bytes]
        self.ids[label] = forms

    def check(
        self, where: str, data: bytes | str, *, ids: bool, skip_ids: Iterable[str] = ()
    ) -> list[Finding]:
        """Every needle found in ``data`` (any view of it)."""
        raw = data.encode() if isinstance(data, str) else data
        found: dict[str, None] = {}
        id_labels = [label for label in self.ids if label not in set(skip_ids)] if ids else []
        for view in views(raw):
            lowered = view.lower()
            for label, secret in self.secrets.items():
                if secret in view:
                    found[label] = None
            for label in id_labels:
                for form in self.ids[label]:
                    if (form in lowered) if len(form) != 16 else (form in view):
                        found[label] = None
        return [Finding(where, label) for label in found]


def as_bytes(value: Any) -> bytes:
    """A store value as the bytes to search (text encoded, everything else by its repr)."""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if isinstance(value, str):
        return value.encode()
    return str(value).encode()


# -- what the store holds ---------------------------------------------------------------------------------


async def postgres_rows(url: str, schema: str) -> dict[str, list[dict[str, Any]]]:
    conn = await asyncpg.connect(url, timeout=5)
    try:
        tables = [
            r["table_name"]
            for r in await conn.fetch(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = $1", schema
            )
        ]
        out: dict[str, list[dict[str, Any]]] = {}
        for table in tables:
            # Every column as text too (json, arrays, numerics): asyncpg's own decoding of odd
            # types is not what we want to rely on; bytea columns stay bytes.
            rows = await conn.fetch(f'SELECT * FROM "{schema}"."{table}"')
            out[table] = [dict(r) for r in rows]
        return out
    finally:
        await conn.close()


def sqlite_rows(path: Path) -> dict[str, list[dict[str, Any]]]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        conn.row_factory = sqlite3.Row
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return {t: [dict(r) for r in conn.execute(f'SELECT * FROM "{t}"')] for t in tables}
    finally:
        conn.close()


def scan_store(rows: dict[str, list[dict[str, Any]]], needles: Needles, label: str) -> list[Finding]:
    findings: list[Finding] = []
    for table, table_rows in rows.items():
        audit = "audit" in table
        for row in table_rows:
            for column, value in row.items():
                if value is None:
                    continue
                findings += needles.check(f"{label} {table}.{column}", as_bytes(value), ids=audit)
    return findings


def scan_files(root: Path, needles: Needles) -> tuple[list[Finding], int]:
    """Secrets in every file under ``root`` (ids are legitimately in the SQLite file)."""
    findings: list[Finding] = []
    count = 0
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        count += 1
        findings += needles.check(f"file {path.relative_to(root)}", path.read_bytes(), ids=False)
    return findings, count


# -- what Redis holds and hears ---------------------------------------------------------------------------


def parse_monitor_line(line: bytes) -> list[bytes]:
    """The arguments of one MONITOR line (Redis quotes each one, escaping like ``sdscatrepr``)."""
    _, _, rest = line.partition(b"] ")
    args: list[bytes] = []
    i, n = 0, len(rest)
    escapes = {ord("n"): b"\n", ord("r"): b"\r", ord("t"): b"\t", ord("a"): b"\a", ord("b"): b"\b"}
    while i < n:
        if rest[i] != ord('"'):
            i += 1
            continue
        i += 1
        out = bytearray()
        while i < n and rest[i] != ord('"'):
            ch = rest[i]
            if ch == ord("\\") and i + 1 < n:
                nxt = rest[i + 1]
                if nxt == ord("x") and i + 3 < n:
                    out.append(int(rest[i + 2 : i + 4], 16))
                    i += 4
                    continue
                out += escapes.get(nxt, bytes([nxt]))
                i += 2
                continue
            out.append(ch)
            i += 1
        args.append(bytes(out))
        i += 1
    return args


class RedisWatch:
    """PSUBSCRIBE ``prefix*`` and MONITOR, from before the servers start until ``stop``."""

    def __init__(self, url: str, prefix: str) -> None:
        self.url = url
        self.prefix = prefix.encode()
        self.messages: list[tuple[bytes, bytes]] = []  # (channel, body)
        self.commands: list[list[bytes]] = []  # MONITOR lines that name the prefix, parsed
        self._client: Any = aioredis.from_url(url)
        self._pubsub = self._client.pubsub()
        self._tasks: list[asyncio.Task[None]] = []
        self._monitor: asyncio.StreamWriter | None = None

    async def start(self) -> None:
        await self._pubsub.psubscribe(self.prefix + b"*")
        # psubscribe's confirmation is read by get_message: wait for it, so nothing is missed.
        while True:
            msg = await self._pubsub.get_message(timeout=5)
            if msg is not None and msg["type"] == "psubscribe":
                break
        self._tasks.append(asyncio.create_task(self._read_pubsub()))
        parts = urlsplit(self.url)
        reader, writer = await asyncio.open_connection(parts.hostname or "127.0.0.1", parts.port or 6379)
        writer.write(b"MONITOR\r\n")
        assert await reader.readline() == b"+OK\r\n"
        self._monitor = writer
        self._tasks.append(asyncio.create_task(self._read_monitor(reader)))

    async def _read_pubsub(self) -> None:
        while True:
            msg = await self._pubsub.get_message(timeout=1)
            if msg is not None and msg["type"] == "pmessage":
                self.messages.append((msg["channel"], msg["data"]))

    async def _read_monitor(self, reader: asyncio.StreamReader) -> None:
        # Lines split by hand: another client's command may be longer than any readline limit.
        pending = b""
        while chunk := await reader.read(1 << 16):
            *lines, pending = (pending + chunk).split(b"\r\n")
            for line in lines:
                if self.prefix in line:  # other tests share this Redis
                    self.commands.append(parse_monitor_line(line))

    def missing(self, payloads: Iterable[bytes]) -> list[str]:
        """Which of ``payloads`` the pub/sub capture or the MONITOR stream has not seen (yet)."""
        published = b"".join(body for _, body in self.messages)
        monitored = [arg for command in self.commands for arg in command]
        out = []
        for payload in payloads:
            if payload not in published:
                out.append(f"pub/sub lacks {payload[:8].hex()}")
            if not any(payload in arg for arg in monitored):
                out.append(f"MONITOR lacks {payload[:8].hex()}")
        return out

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._monitor is not None:
            self._monitor.close()
            with contextlib.suppress(ConnectionError):
                await self._monitor.wait_closed()
        await self._pubsub.aclose()  # type: ignore[no-untyped-call]
        await self._client.aclose()


async def redis_keyspace(url: str, prefix: str) -> tuple[list[bytes], dict[bytes, list[bytes]]]:
    """Every key name in the database, and the values (all types) of the prefix's keys."""
    client: Any = aioredis.from_url(url)  # bytes in, bytes out (no decode_responses)
    try:
        names = [k async for k in client.scan_iter(count=1000)]
        values: dict[bytes, list[bytes]] = {}
        for key in names:
            if not key.startswith(prefix.encode()):
                continue
            kind = (await client.type(key)).decode()
            got: list[bytes] = []
            if kind == "string":
                got = [await client.get(key) or b""]
            elif kind == "hash":
                got = [x for kv in (await client.hgetall(key)).items() for x in kv]
            elif kind == "list":
                got = list(await client.lrange(key, 0, -1))
            elif kind == "set":
                got = list(await client.smembers(key))
            elif kind == "zset":
                got = [m for m, _ in await client.zrange(key, 0, -1, withscores=True)]
            elif kind == "stream":
                got = [x for _, entry in await client.xrange(key) for kv in entry.items() for x in kv]
            elif kind != "none":  # expired since the scan
                raise AssertionError(f"redis key {key!r} of an unscanned type {kind}")
            values[key] = got
        return names, values
    finally:
        await client.aclose()


# -- what was logged ------------------------------------------------------------------------------------


def log_lines(records: Iterable[logging.LogRecord]) -> list[tuple[str, str, str]]:
    """(logger, raw message, line) for every server-side record: the line as the JSON handler
    writes it (``RedactingFilter`` masks credentials first, e.g. a bearer JWT, which names its
    device), the raw message as it reached the logger (plaintext must not even get that far)."""
    formatter = JsonFormatter()
    redact = RedactingFilter()
    out = []
    for record in records:
        if record.name.startswith(CLIENT_LOGGER):
            continue  # the test's devices, not the server
        raw = record.getMessage()
        written = copy.copy(record)
        redact.filter(written)
        out.append((record.name, raw, formatter.format(written)))
    return out


# -- the scenario -----------------------------------------------------------------------------------------


def edits(device: HPDevice, marker: str, round_no: int) -> Callable[[HPDevice], None]:
    """One user edit: a ledger line in the text, an entry in the map (both carrying the marker)."""

    def change(d: HPDevice) -> None:
        d.text.insert(len(d.text), f"[{d.name}{round_no}: {marker} lunch 1280 yen]")
        d.map[f"{d.name}-{round_no}"] = {"note": f"{marker} from {d.name}", "amount": 1280 + round_no}
        if round_no == ROUNDS - 1:
            del d.map[f"{d.name}-0"]  # deletions travel too

    return change


def converged(devices: list[HPDevice]) -> bool:
    vectors = [d.state_vector() for d in devices]
    contents = [d.contents() for d in devices]
    return all(v == vectors[0] for v in vectors) and all(c == contents[0] for c in contents)


@contextlib.asynccontextmanager
async def http(port: int) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as session:
        yield session


@pytest.mark.parametrize("store", ["postgresql", "sqlite"])
async def test_three_devices_converge_and_the_server_side_holds_no_plaintext(
    store: str, server_factory: Any, make_settings: Callable[..., Settings], pg_url: str,
    pg_schema: str, redis_url: str, redis_prefix: str, caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG)
    marker = f"zk-marker-{uuid.uuid4().hex}"
    # One JWT_SECRET for both nodes, as in production (pairing codes are HMACed with a key from it).
    common: dict[str, Any] = {"redis_url": redis_url, "redis_prefix": redis_prefix,
                              "jwt_secret": "zk-" + uuid.uuid4().hex}
    if store == "postgresql":
        common.update(database_url=pg_url, database_schema=pg_schema)

    watch = RedisWatch(redis_url, redis_prefix)
    await watch.start()
    a, b, c = HPDevice("a"), HPDevice("b", binary=True), HPDevice("c")
    devices = [a, b, c]
    try:
        # Both nodes share the store (one SQLite file in one DATA_DIR, or one schema) and Redis.
        node1 = await server_factory(make_settings(**common))
        node2 = await server_factory(make_settings(**common))
        async with http(node1.port) as http1, http(node2.port) as http2:
            await a.register(http1)
            await b.register(http1)
            await c.register(http2)
            book_id = await a.create_book(http1)
            # B and C join by pairing, through either node: A's code, their verify.
            assert await b.join(http1, await a.pairing_code(http1, book_id)) == a.public_key
            assert await c.join(http2, await a.pairing_code(http1, book_id)) == a.public_key

        await a.connect(node1.port, book_id)
        await b.connect(node1.port, book_id)
        await c.connect(node2.port, book_id)
        await a.share_key_with(b.public_key)
        await a.share_key_with(c.public_key)
        await b.wait_until(lambda: b.has_key)
        await c.wait_until(lambda: c.has_key)
        assert a.book_key == b.book_key == c.book_key

        async def user(device: HPDevice) -> None:
            for round_no in range(ROUNDS):
                await device.edit(edits(device, marker, round_no))

        await asyncio.gather(*(user(d) for d in devices))
        try:
            await wait_for(lambda: converged(devices), timeout=10)
        except AssertionError:
            states = [(d.name, d.contents(), sorted(d.seen_seqs)) for d in devices]
            raise AssertionError(f"no convergence: {states}") from None

        view = a.contents()
        assert set(view["map"]) == {f"{d.name}-{r}" for d in devices for r in range(1, ROUNDS)}
        for d in devices:
            for r in range(ROUNDS):
                assert view["text"].count(f"[{d.name}{r}: {marker} lunch 1280 yen]") == 1
            assert view["map"][f"{d.name}-1"] == {"note": f"{marker} from {d.name}", "amount": 1281.0}
            assert d.pending == [] and d.duplicates == 0
        # Every device saw every other device's ops (the key shares too, for A's peers).
        all_sent = sum(len(d.sent) for d in devices)
        for d in devices:
            assert len(d.seen_seqs) == all_sent, (d.name, len(d.seen_seqs), all_sent)

        # An encrypted photo (the marker in its "pixels") and an encrypted snapshot of the whole
        # document go through the blob store; the other side of the book opens both.
        photo = f"\xff\xd8 photo of the receipt: {marker}".encode()
        async with http(node1.port) as http1, http(node2.port) as http2:
            photo_id = await a.upload_photo(http1, photo)
            assert await c.download_photo(http2, photo_id) == photo
            await b.upload_snapshot(http1, max(b.seen_seqs))
            assert await c.restore_snapshot(http2) == max(b.seen_seqs)
        assert converged(devices)  # the snapshot holds nothing the documents did not

        for d in devices:
            await d.close()
        await node1.close()  # their last log lines (offline, drain) are scanned too
        await node2.close()
        # The captures are live: each ciphertext the devices sent went through both (read
        # asynchronously, so wait for the last ones).
        sent = [p for d in devices for p in d.sent]
        try:
            await wait_for(lambda: not watch.missing(sent), timeout=10)
        except AssertionError:
            raise AssertionError(f"Redis captures incomplete: {watch.missing(sent)}") from None
    finally:
        for d in devices:
            await d.close()
        await watch.stop()

    # -- the scan --------------------------------------------------------------------------------------
    assert a.book_key is not None
    needles = Needles(secrets={"plaintext marker": marker.encode(), "raw book key": a.book_key})
    needles.add_id("book id", book_id)
    for d in devices:
        needles.add_id(f"device id of {d.name}", d.device_id)
    findings: list[Finding] = []

    # The store, table by table.
    settings = node1.settings
    if store == "postgresql":
        rows = await postgres_rows(pg_url, pg_schema)
    else:
        rows = sqlite_rows(Path(settings.effective_database_url.removeprefix("sqlite:///")))
    findings += scan_store(rows, needles, store)
    client_ip = Needles(ids={"raw client IP": [b"127.0.0.1"]})
    for row in rows["audit_log"]:  # none yet: pairing and revocation will write some
        for column, value in row.items():
            findings += client_ip.check(f"{store} audit_log.{column}", as_bytes(value), ids=True)
    assert {r["id"] for r in rows["devices"]} >= {d.device_id for d in devices}  # the scan reads
    assert any(needles.check("devices", as_bytes(r["id"]), ids=True) for r in rows["devices"])
    assert "audit_log" in rows

    # DATA_DIR: the SQLite file and WAL, the blob store directory, generated secrets.
    blobs = node1.services.blobs
    assert isinstance(blobs, LocalBlobStore) and blobs.root.is_relative_to(settings.data_path)
    assert node2.settings.data_path == settings.data_path
    file_findings, file_count = scan_files(settings.data_path, needles)
    findings += file_findings
    assert file_count > 0

    # Redis: key names everywhere, values under the prefix; pub/sub; every command for the prefix.
    names, values = await redis_keyspace(redis_url, redis_prefix)
    for name in names:
        findings += needles.check(f"redis key name {name!r}", name, ids=True)
    for name, items in values.items():
        for item in items:
            findings += needles.check(f"redis value of {name!r}", item, ids=True)
    assert any(name.startswith(redis_prefix.encode()) for name in names)  # the scan sees keys

    assert watch.messages, "no pub/sub message captured"
    device_labels = [label for label in needles.ids if label.startswith("device id")]
    for channel, body in watch.messages:
        findings += needles.check(f"pub/sub channel {channel!r}", channel, ids=True)
        findings += needles.check(f"pub/sub message on {channel!r}", body, ids=True, skip_ids=device_labels)
    for command in watch.commands:
        for arg in command:
            findings += needles.check(f"redis command {command[0]!r}", arg, ids=False)

    # Logs: every record at DEBUG, as written; and whatever reached stdout/stderr. Bodies are never
    # logged either (spec README "Operations"): no op payload, not even its first bytes (the
    # kind byte and most of the nonce), in any form.
    log_needles = Needles(secrets=dict(needles.secrets), ids=needles.ids)
    for d in devices:
        for i, payload in enumerate(d.sent):
            log_needles.secrets[f"op payload {d.name}#{i}"] = payload[:12]
    lines = log_lines(caplog.records)
    assert any('"route":"/api/v1/devices/register"' in line for _, _, line in lines), "no access log captured"
    for logger, raw, line in lines:
        findings += log_needles.check(f"log line of {logger}: {line[:300]}", line, ids=True)
        findings += log_needles.check(f"log message to {logger}: {raw[:300]}", raw, ids=False)
    out, err = capfd.readouterr()
    findings += log_needles.check("stdout", out, ids=True)
    findings += log_needles.check("stderr", err, ids=True)

    # The hashed forms are what operators correlate on; they are not leaks.
    assert needles.check("hash", hash_id(book_id), ids=True) == []

    unique_findings = list(dict.fromkeys(findings))
    assert not unique_findings, "zero-knowledge broken:\n  " + "\n  ".join(map(str, unique_findings))


# -- the scanner, on planted leaks --------------------------------------------------------------------------


def test_the_scan_finds_every_form_of_a_leak() -> None:
    marker = "zk-marker-" + uuid.uuid4().hex
    key = bytes(range(32))
    device = str(uuid.uuid4())
    needles = Needles(secrets={"marker": marker.encode(), "key": key})
    needles.add_id("device", device)

    def found(data: bytes | str, *, ids: bool = True) -> set[str]:
        return {f.what for f in needles.check("x", data, ids=ids)}

    plaintext = f"lunch {marker} 1280".encode()
    assert found(plaintext) == {"marker"}
    assert found(b"payload=" + base64.b64encode(plaintext)) == {"marker"}
    assert found(base64.urlsafe_b64encode(b"\xff\xfe" + plaintext).rstrip(b"=")) == {"marker"}
    assert found(json.dumps({"p": base64.b64encode(plaintext).decode()})) == {"marker"}
    assert found(plaintext.hex().upper()) == {"marker"}
    assert found(msgpack.packb([{"payload": plaintext}, None, 7], use_bin_type=True)) == {"marker"}
    doubly = base64.b64encode(json.dumps({"inner": base64.b64encode(plaintext).decode()}).encode())
    assert found(doubly) == {"marker"}
    assert found(repr(b"\x00" + plaintext)) == {"marker"}
    assert found(b"\x00" + key + b"\x01") == {"key"}
    assert found(repr(key)) == {"key"}
    assert found(base64.b64encode(key)) == {"key"}
    assert found(key.hex()) == {"key"}
    assert found(f"relay op from {device}") == {"device"}
    assert found(f"relay op from {device.upper()}") == {"device"}
    assert found(f"relay op from {uuid.UUID(device).hex}") == {"device"}
    assert found(b"\x10" + uuid.UUID(device).bytes) == {"device"}
    claims = json.dumps({"sub": device}).encode()
    jwt_like = b".".join(base64.urlsafe_b64encode(p).rstrip(b"=") for p in (b'{"alg":"EdDSA"}', claims, b"s"))
    assert found(b"Bearer " + jwt_like) == {"device"}
    assert found(f"relay op from {device}", ids=False) == set()
    assert found(f"relay op from {hash_id(device)}") == set()
    assert found(b"nothing here " + base64.b64encode(b"ciphertext" * 5)) == set()

    line = b'+1.0 [0 127.0.0.1:1] "EVALSHA" "ab" "1" "sb:seq:k" "\\x00\\xff' + marker.encode() + b'" "a\\"b\\n"'
    parsed = parse_monitor_line(line)
    assert parsed == [b"EVALSHA", b"ab", b"1", b"sb:seq:k", b"\x00\xff" + marker.encode(), b'a"b\n']
