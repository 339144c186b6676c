"""Home Pocket photos (rest.md "Photos and blobs"): streamed and direct uploads, downloads through
the returned URLs, the size limit, membership, deletion and the seed's per-device limits.

Everything runs on a real server (server_factory) over real HTTP, on the local blob store with
SQLite and on S3 (moto) with PostgreSQL + Redis; the round trip runs on all four combinations.
moto checks neither presigned signatures, expiry nor POST policies, so refused URLs are tested on
the local store (which signs its own); on S3 the tests show what ``/complete`` catches instead.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import parse_qs, urlencode, urlsplit

import aiohttp
import pytest

from relay.server import RunningServer
from shared.blobs.local import LocalBlobStore
from shared.blobs.s3 import S3BlobStore
from shared.config import Settings
from shared.secrets import hash_id
from tests.conftest import PG_URL, REDIS_URL
from tests.device_helpers import DeviceKey, insert_book, insert_device
from tests.fixtures.s3 import S3_CREDENTIALS

MiB = 1024 * 1024
LIMIT = 10 * MiB  # PHOTO_MAX_BYTES default
KEY_SHAPE = re.compile(r"^photos/[0-9a-f]{16}/[0-9a-f]{32}\.enc$")
ISO_UTC = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")
DIAGONAL = ["local-sqlite", "s3-postgresql"]
ALL = ["local-sqlite", "local-postgresql", "s3-sqlite", "s3-postgresql"]


@dataclass
class Reply:
    status: int
    body: dict[str, Any]
    headers: dict[str, str]

    @property
    def data(self) -> Any:
        assert self.body.get("success") is True, (self.status, self.body)
        return self.body["data"]

    @property
    def code(self) -> str:
        assert self.body.get("success") is False, (self.status, self.body)
        return str(self.body["error"]["code"])

    def error(self, status: int, code: str) -> dict[str, Any]:
        assert (self.status, self.code) == (status, code), self.body
        return dict(self.body["error"])


@dataclass
class Stack:
    kind: str  # "local" or "s3"
    server: RunningServer
    http: aiohttp.ClientSession

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server.port}/api/v1"

    @property
    def db(self) -> Any:
        return self.server.services.db

    @property
    def blobs(self) -> Any:
        return self.server.services.blobs

    async def call(self, method: str, path: str, key: DeviceKey | None = None, **kwargs: Any) -> Reply:
        headers = dict(kwargs.pop("headers", {}))
        if key is not None:
            headers["Authorization"] = f"Bearer {key.token()}"
        async with self.http.request(method, self.base + path, headers=headers, **kwargs) as resp:
            body = await resp.json() if resp.status != 204 else {}
            return Reply(resp.status, body, dict(resp.headers))

    async def upload(self, key: DeviceKey | None, meta: dict[str, Any] | None, data: Any, **kwargs: Any) -> Reply:
        return await self.call("POST", "/photos/upload", key, data=form(meta, data), **kwargs)

    async def member(self, book_id: str | None = None) -> tuple[DeviceKey, str]:
        """A registered device, in ``book_id`` (or in a new book of its own)."""
        key = await insert_device(self.db)
        if book_id is None:
            return key, await insert_book(self.db, key)
        assert key.device_id is not None
        await self.db.execute(
            "INSERT INTO book_members (book_id, device_id, joined_at) VALUES ($1, $2, $3)",
            book_id, key.device_id, int(time.time() * 1000),
        )
        return key, book_id

    async def objects(self) -> list[str]:
        """Every object and every leftover (temporary file, open multipart upload) in the store."""
        store = self.blobs
        if isinstance(store, LocalBlobStore):
            return sorted(
                p.relative_to(store.root).as_posix() for p in store.root.rglob("*")
                if p.is_file() and not p.name.endswith("~ct")
            )
        s3 = cast(S3BlobStore, store)
        listed = await s3._client.list_objects_v2(Bucket=s3._bucket)
        uploads = await s3._client.list_multipart_uploads(Bucket=s3._bucket)
        return sorted(
            [o["Key"] for o in listed.get("Contents", [])]
            + [f"(multipart) {u['Key']}" for u in uploads.get("Uploads", [])]
        )

    async def photo_rows(self) -> list[dict[str, Any]]:
        return [dict(r) for r in await self.db.fetch("SELECT * FROM photos ORDER BY created_at, id")]


MakeStack = Callable[..., Awaitable[Stack]]


@pytest.fixture(params=DIAGONAL)
def combo(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def make_stack(
    combo: str, request: pytest.FixtureRequest, make_settings: Callable[..., Settings],
    pg_schema: str, redis_prefix: str, server_factory: Any,
) -> AsyncIterator[MakeStack]:
    """A running server on ``combo``'s blob store and database, with settings ``overrides``."""
    sessions: list[aiohttp.ClientSession] = []

    async def make(**overrides: Any) -> Stack:
        kind, backend = combo.split("-")
        settings: dict[str, Any] = {}
        if backend == "postgresql":
            settings.update(database_url=PG_URL, database_schema=pg_schema, redis_url=REDIS_URL, redis_prefix=redis_prefix)
        if kind == "s3":
            settings.update(
                s3_endpoint=request.getfixturevalue("s3_endpoint"), s3_bucket=request.getfixturevalue("s3_bucket"),
                s3_access_key_id=S3_CREDENTIALS["access_key_id"],
                s3_secret_access_key=S3_CREDENTIALS["secret_access_key"],
            )
        settings.update(overrides)
        server = await server_factory(make_settings(**settings))
        http = aiohttp.ClientSession()
        sessions.append(http)
        return Stack(kind, server, http)

    yield make
    for http in sessions:
        await http.close()


@pytest.fixture
async def stack(make_stack: MakeStack) -> Stack:
    return await make_stack()


all_combos = pytest.mark.parametrize("combo", ALL, indirect=True)
local_only = pytest.mark.parametrize("combo", ["local-sqlite"], indirect=True)
s3_only = pytest.mark.parametrize("combo", ["s3-postgresql"], indirect=True)


def meta_for(book_id: str, size: int, tx: str | None = None, mime: str = "image/jpeg") -> dict[str, Any]:
    return {"book_id": book_id, "transaction_id": tx or f"tx-{os.urandom(6).hex()}", "size_bytes": size, "mime_type": mime}


def form(meta: dict[str, Any] | str | None, data: Any, *, file_first: bool = False, extra: bool = False) -> aiohttp.MultipartWriter:
    """The contract's multipart body: ``metadata`` (JSON) then ``file``. ``data`` may be bytes
    (the body gets a Content-Length) or an async iterable (sent chunked, size unknown)."""
    writer = aiohttp.MultipartWriter("form-data")
    parts: list[Callable[[], None]] = []

    def add_meta() -> None:
        text = meta if isinstance(meta, str) else json.dumps(meta)
        part = writer.append(text, {"Content-Type": "application/json"})
        part.set_content_disposition("form-data", name="metadata")

    def add_file() -> None:
        body = io.BytesIO(data) if isinstance(data, bytes) else data  # BytesIO: size known, not copied
        part = writer.append(body, {"Content-Type": "application/octet-stream"})
        part.set_content_disposition("form-data", name="file", filename="photo.enc")

    if meta is not None:
        parts.append(add_meta)
    if data is not None:
        parts.insert(0 if file_first else len(parts), add_file)
    for add in parts:
        add()
    if extra:
        writer.append("more", {"Content-Type": "text/plain"}).set_content_disposition("form-data", name="extra")
    return writer


async def chunked(data: bytes, size: int = 64 * 1024) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]
        await asyncio.sleep(0)


async def download(stack: Stack, url: str) -> tuple[int, bytes]:
    async with stack.http.get(url) as resp:
        return resp.status, await resp.read()


async def direct_upload(stack: Stack, start: dict[str, Any], body: bytes, content_type: str) -> int:
    """Follow a direct-upload answer as a client would: PUT with headers, or the POST form."""
    if start["upload_method"] == "PUT":
        headers = {**start["upload_headers"], "Content-Type": content_type}
        async with stack.http.put(start["upload_url"], data=io.BytesIO(body), headers=headers) as resp:
            return resp.status
    assert start["upload_method"] == "POST" and start["upload_headers"] == {}
    fields = aiohttp.FormData()
    for name, value in start["upload_fields"].items():
        fields.add_field(name, content_type if name == "Content-Type" else value)
    fields.add_field("file", io.BytesIO(body), filename="photo.enc", content_type=content_type)
    async with stack.http.post(start["upload_url"], data=fields) as resp:
        return resp.status


# -- streamed upload and download ------------------------------------------------------------


@all_combos
async def test_streamed_upload_then_download_is_byte_identical(stack: Stack) -> None:
    key, book_id = await stack.member()
    data = os.urandom(1_000_003)
    meta = meta_for(book_id, len(data))
    reply = await stack.upload(key, meta, data)
    assert reply.status == 201, reply.body
    stored = reply.data
    assert set(stored) == {"photo_id", "s3_key", "size_bytes"}
    assert stored["size_bytes"] == len(data)
    assert KEY_SHAPE.match(stored["s3_key"]), stored["s3_key"]
    assert stored["s3_key"].split("/")[1] == hash_id(book_id)
    assert await stack.objects() == [stored["s3_key"]]

    got = await stack.call("GET", f"/photos/{stored['photo_id']}", key)
    assert got.status == 200
    photo = got.data
    assert set(photo) == {"photo_id", "download_url", "expires_in", "size_bytes", "created_at"}
    assert (photo["photo_id"], photo["size_bytes"], photo["expires_in"]) == (stored["photo_id"], len(data), 300)
    assert ISO_UTC.match(photo["created_at"])
    assert await download(stack, photo["download_url"]) == (200, data)

    # Zero knowledge: no raw book, device or transaction id in the store (keys and, locally,
    # every file), and the transaction id only as its hash in the database.
    raw_ids = [book_id, str(key.device_id), meta["transaction_id"]]
    names = "\n".join(await stack.objects())
    assert not [i for i in raw_ids if i in names]
    if isinstance(stack.blobs, LocalBlobStore):
        for path in stack.blobs.root.rglob("*"):
            if path.is_file():
                content = path.read_bytes()
                assert not [i for i in raw_ids if i.encode() in content], path
    row = (await stack.photo_rows())[0]
    assert row["transaction_hash"] == hash_id(meta["transaction_id"], 64)
    assert meta["transaction_id"] not in json.dumps(row)
    assert (row["state"], row["device_id"], row["mime_type"]) == ("ready", key.device_id, "image/jpeg")


async def test_a_photo_of_exactly_the_limit_streams_past_the_json_body_limit(stack: Stack) -> None:
    """10 MiB is ten times MAX_BODY_BYTES (client_max_size): the file part is never read whole."""
    assert stack.server.settings.max_body_bytes < LIMIT
    key, book_id = await stack.member()
    data = os.urandom(LIMIT)
    for body in (data, chunked(data)):  # with a Content-Length, then chunked
        reply = await stack.upload(key, meta_for(book_id, LIMIT), body)
        assert reply.status == 201, reply.body
        photo = (await stack.call("GET", f"/photos/{reply.data['photo_id']}", key)).data
        assert await download(stack, photo["download_url"]) == (200, data)
    assert len(await stack.objects()) == 2


async def test_mime_type_is_normalised_and_the_object_typed(stack: Stack) -> None:
    key, book_id = await stack.member()
    reply = await stack.upload(key, meta_for(book_id, 10, mime="Image/HEIC"), b"0123456789")
    assert reply.status == 201, reply.body
    info = await stack.blobs.head(reply.data["s3_key"])
    assert (info.size, info.content_type) == (10, "image/heic")


# -- the size limit -------------------------------------------------------------------------


async def test_declared_size_over_the_limit_is_refused(stack: Stack) -> None:
    key, book_id = await stack.member()
    data = os.urandom(11 * MiB)
    # Declared in size_bytes (the Content-Length shows it too).
    error = (await stack.upload(key, meta_for(book_id, len(data)), data)).error(400, "PHOTO_TOO_LARGE")
    assert error["details"] == {"max_bytes": LIMIT}
    # Declared in size_bytes only: the body is chunked.
    (await stack.upload(key, meta_for(book_id, LIMIT + 1), chunked(data))).error(400, "PHOTO_TOO_LARGE")
    # Shown only by the Content-Length: size_bytes lies.
    (await stack.upload(key, meta_for(book_id, 1000), data)).error(400, "PHOTO_TOO_LARGE")
    # The direct upload refuses it before any URL exists.
    (await stack.call("POST", "/photos/upload", key, json=meta_for(book_id, LIMIT + 1))).error(400, "PHOTO_TOO_LARGE")
    assert await stack.objects() == []
    assert await stack.photo_rows() == []


async def test_undeclared_oversize_is_refused_from_the_bytes_streamed(stack: Stack) -> None:
    """size_bytes lies and there is no Content-Length: only the stream shows it. On S3 the
    11 MiB pass the 8 MiB part size, so a multipart upload was started and must be aborted."""
    key, book_id = await stack.member()
    data = os.urandom(11 * MiB)
    (await stack.upload(key, meta_for(book_id, 1000, tx="big"), chunked(data))).error(400, "PHOTO_TOO_LARGE")
    (await stack.upload(key, meta_for(book_id, LIMIT, tx="big"), chunked(data))).error(400, "PHOTO_TOO_LARGE")
    assert await stack.objects() == []
    assert await stack.photo_rows() == []
    # The refused upload claimed nothing: its transaction can be uploaded properly afterwards.
    assert (await stack.upload(key, meta_for(book_id, 5, tx="big"), b"12345")).status == 201


async def test_the_file_must_have_the_declared_size(stack: Stack) -> None:
    key, book_id = await stack.member()
    for declared, data in ((1000, os.urandom(999)), (1000, os.urandom(1001)), (1000, chunked(os.urandom(3 * MiB)))):
        error = (await stack.upload(key, meta_for(book_id, declared), data)).error(400, "VALIDATION_ERROR")
        assert error["details"]["field"] == "size_bytes", error
    assert await stack.objects() == []
    assert await stack.photo_rows() == []


@local_only
async def test_oversize_is_answered_before_the_body_is_read(stack: Stack) -> None:
    """A server that waited for the rest of the body would never answer: the timeouts below only
    detect that hang."""
    key, book_id = await stack.member()
    boundary = "b0undary"
    metadata = json.dumps(meta_for(book_id, LIMIT + 1))
    start = (
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"metadata\"\r\n"
        f"Content-Type: application/json\r\n\r\n{metadata}\r\n"
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"p\"\r\n\r\n"
    ).encode() + b"the first bytes of the file"

    async def status_of(head: str, body: bytes) -> tuple[int, str]:
        reader, writer = await asyncio.open_connection("127.0.0.1", stack.server.port)
        try:
            writer.write(head.encode() + body)
            await writer.drain()
            status_line = await asyncio.wait_for(reader.readline(), timeout=10)
            headers = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=10)
            length = int(re.search(rb"(?i)content-length: (\d+)", headers).group(1))  # type: ignore[union-attr]
            body = await asyncio.wait_for(reader.readexactly(length), timeout=10)
            return int(status_line.split()[1]), json.loads(body)["error"]["code"]
        finally:
            writer.close()

    common = (
        f"POST /api/v1/photos/upload HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {key.token()}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
    )
    # Content-Length of 100 MiB, nothing of the body sent.
    assert await status_of(common + f"Content-Length: {100 * MiB}\r\n\r\n", b"") == (400, "PHOTO_TOO_LARGE")
    # Chunked: the metadata declares too much; the file part has only begun.
    chunk = f"{len(start):x}\r\n".encode() + start + b"\r\n"
    assert await status_of(common + "Transfer-Encoding: chunked\r\n\r\n", chunk) == (400, "PHOTO_TOO_LARGE")
    assert await stack.objects() == []


# -- validation ------------------------------------------------------------------------------


async def test_metadata_validation(stack: Stack) -> None:
    key, book_id = await stack.member()
    good = meta_for(book_id, 4)
    data = b"four"

    async def field_of(reply: Reply) -> str:
        return str(reply.error(400, "VALIDATION_ERROR")["details"]["field"])

    cases: list[tuple[str, aiohttp.MultipartWriter]] = [
        ("metadata", form("{not json", data)),
        ("metadata", form("[1, 2]", data)),
        ("metadata", form(json.dumps({**good, "pad": "x" * 9000}), data)),
        ("metadata", form(good, data, file_first=True)),
        ("metadata", form(None, data)),
        ("file", form(good, None)),
        ("body", form(good, data, extra=True)),
    ]
    for name in ("book_id", "transaction_id", "size_bytes", "mime_type"):
        cases.append((name, form({k: v for k, v in good.items() if k != name}, data)))
    for value in (0, -1, "4", True, 4.0):
        cases.append(("size_bytes", form({**good, "size_bytes": value}, data)))
    for value in ("jpeg", "image/jpeg; charset=binary", "image /jpeg", "image/", "/jpeg", "ima\u00e9ge/x", 7):
        cases.append(("mime_type", form({**good, "mime_type": value}, data)))
    for value in ("", "t" * 129, 12):
        cases.append(("transaction_id", form({**good, "transaction_id": value}, data)))
    cases.append(("book_id", form({**good, "book_id": ""}, data)))
    for expected, body in cases:
        assert await field_of(await stack.call("POST", "/photos/upload", key, data=body)) == expected, expected
        # The JSON (direct upload) form validates the same fields the same way.
    for name, value in (("size_bytes", "4"), ("mime_type", "jpeg"), ("transaction_id", "")):
        reply = await stack.call("POST", "/photos/upload", key, json={**good, name: value})
        assert await field_of(reply) == name
    assert await field_of(await stack.call("POST", "/photos/upload", key, data=b"raw", headers={"Content-Type": "image/jpeg"})) == "body"
    no_boundary = await stack.call("POST", "/photos/upload", key, data=b"x", headers={"Content-Type": "multipart/form-data"})
    assert await field_of(no_boundary) == "body"
    assert await stack.objects() == []
    assert await stack.photo_rows() == []
    # Transaction ids of 1 and 128 characters are fine.
    for tx in ("t", "t" * 128):
        assert (await stack.upload(key, {**good, "transaction_id": tx}, data)).status == 201


# -- one photo per transaction ---------------------------------------------------------------


async def test_the_same_transaction_twice_is_one_photo(stack: Stack) -> None:
    key, book_id = await stack.member()
    other_key, other_book = await stack.member()
    first_bytes = os.urandom(2000)
    meta = meta_for(book_id, 2000, tx="receipt-1")
    first = await stack.upload(key, meta, first_bytes)
    assert first.status == 201
    # A retry (another body even): 200 with the same photo; nothing new is stored.
    again = await stack.upload(key, meta, os.urandom(2000))
    assert (again.status, again.data) == (200, first.data)
    started = await stack.call("POST", "/photos/upload", key, json=meta)
    assert (started.status, started.data) == (200, first.data)
    photo = (await stack.call("GET", f"/photos/{first.data['photo_id']}", key)).data
    assert await download(stack, photo["download_url"]) == (200, first_bytes)
    # Other transactions, and the same transaction id in another book, are other photos.
    second = await stack.upload(key, meta_for(book_id, 10, tx="receipt-2"), b"0" * 10)
    elsewhere = await stack.upload(other_key, {**meta, "book_id": other_book}, first_bytes)
    assert second.status == elsewhere.status == 201
    ids = {first.data["photo_id"], second.data["photo_id"], elsewhere.data["photo_id"]}
    assert len(ids) == 3 and len(await stack.objects()) == 3


async def test_concurrent_uploads_of_one_transaction_make_one_photo(stack: Stack) -> None:
    key, book_id = await stack.member()
    data = os.urandom(300_000)
    meta = meta_for(book_id, len(data), tx="together")
    replies = await asyncio.gather(*(stack.upload(key, meta, data) for _ in range(4)))
    assert all(r.status in (200, 201) for r in replies), [r.body for r in replies]
    assert len({r.data["photo_id"] for r in replies}) == 1
    assert len(await stack.photo_rows()) == 1 and len(await stack.objects()) == 1
    photo = (await stack.call("GET", f"/photos/{replies[0].data['photo_id']}", key)).data
    assert await download(stack, photo["download_url"]) == (200, data)


# -- direct upload ---------------------------------------------------------------------------


@all_combos
async def test_direct_upload_then_complete_then_get(stack: Stack) -> None:
    key, book_id = await stack.member()
    data = os.urandom(700_001)
    meta = meta_for(book_id, len(data), mime="image/png")
    reply = await stack.call("POST", "/photos/upload", key, json=meta)
    assert reply.status == 201, reply.body
    start = reply.data
    assert set(start) == {"photo_id", "s3_key", "upload_url", "expires_in", "upload_method", "upload_fields", "upload_headers"}
    assert start["expires_in"] == 300 and KEY_SHAPE.match(start["s3_key"])
    assert start["upload_method"] == ("PUT" if stack.kind == "local" else "POST")
    photo_id = start["photo_id"]
    # Pending: invisible, and nothing to complete yet.
    error = (await stack.call("GET", f"/photos/{photo_id}", key)).error(404, "PHOTO_NOT_FOUND")
    assert error["details"] == {"state": "pending"}
    (await stack.call("POST", f"/photos/{photo_id}/complete", key)).error(409, "CONFLICT")

    assert await direct_upload(stack, start, data, "image/png") in (200, 201, 204)
    (await stack.call("GET", f"/photos/{photo_id}", key)).error(404, "PHOTO_NOT_FOUND")  # still pending
    done = await stack.call("POST", f"/photos/{photo_id}/complete", key)
    assert (done.status, done.data) == (200, {"photo_id": photo_id, "s3_key": start["s3_key"], "size_bytes": len(data)})
    assert (await stack.call("POST", f"/photos/{photo_id}/complete", key)).data == done.data  # idempotent
    photo = (await stack.call("GET", f"/photos/{photo_id}", key)).data
    assert photo["size_bytes"] == len(data)
    assert await download(stack, photo["download_url"]) == (200, data)
    # The transaction is taken now: both forms answer the existing photo.
    assert (await stack.call("POST", "/photos/upload", key, json=meta)).data == done.data
    assert (await stack.upload(key, meta, data)).data == done.data


async def test_a_pending_photo_is_taken_over_by_a_retry(stack: Stack) -> None:
    key, book_id = await stack.member()
    meta = meta_for(book_id, 100, tx="pending-one")
    first = (await stack.call("POST", "/photos/upload", key, json=meta)).data
    # Starting again (a lost answer): the same photo, a fresh URL, the new declared size.
    again = await stack.call("POST", "/photos/upload", key, json={**meta, "size_bytes": 50})
    assert again.status == 200
    assert (again.data["photo_id"], again.data["s3_key"]) == (first["photo_id"], first["s3_key"])
    assert await direct_upload(stack, again.data, b"x" * 50, "image/jpeg") in (200, 201, 204)
    assert (await stack.call("POST", f"/photos/{first['photo_id']}/complete", key)).data["size_bytes"] == 50
    # A streamed upload takes over a pending photo of its transaction too.
    other = meta_for(book_id, 100, tx="pending-two")
    pending = (await stack.call("POST", "/photos/upload", key, json=other)).data
    streamed = await stack.upload(key, other, b"y" * 100)
    assert streamed.status == 201
    assert streamed.data == {"photo_id": pending["photo_id"], "s3_key": pending["s3_key"], "size_bytes": 100}
    photo = (await stack.call("GET", f"/photos/{pending['photo_id']}", key)).data
    assert await download(stack, photo["download_url"]) == (200, b"y" * 100)
    assert len(await stack.photo_rows()) == 2


@s3_only
async def test_complete_checks_what_s3_accepted(make_stack: MakeStack) -> None:
    """moto ignores the POST policy (content-length-range, Content-Type), as a lax
    S3-compatible store might: ``/complete`` is where the size and type are enforced."""
    stack = await make_stack(photo_max_bytes=1000)
    key, book_id = await stack.member()
    start = (await stack.call("POST", "/photos/upload", key, json=meta_for(book_id, 100))).data
    path = f"/photos/{start['photo_id']}/complete"
    for body, content_type, status, code, field in (
        (b"z" * 101, "image/jpeg", 400, "VALIDATION_ERROR", "size_bytes"),
        (b"z" * 99, "image/jpeg", 400, "VALIDATION_ERROR", "size_bytes"),
        (b"z" * 100, "text/html", 400, "VALIDATION_ERROR", "mime_type"),
        (b"z" * 1001, "image/jpeg", 400, "PHOTO_TOO_LARGE", None),
    ):
        assert await direct_upload(stack, start, body, content_type) in (200, 201, 204)
        error = (await stack.call("POST", path, key)).error(status, code)
        assert error["details"].get("field") == field
        assert await stack.objects() == []  # the refused object is deleted ...
        (await stack.call("GET", f"/photos/{start['photo_id']}", key)).error(404, "PHOTO_NOT_FOUND")
    # ... and the photo stays pending, so the right bytes can still come.
    assert await direct_upload(stack, start, b"z" * 100, "image/jpeg") in (200, 201, 204)
    assert (await stack.call("POST", path, key)).data["size_bytes"] == 100


@local_only
async def test_local_direct_upload_url_enforces_the_declared_size(stack: Stack) -> None:
    key, book_id = await stack.member()
    start = (await stack.call("POST", "/photos/upload", key, json=meta_for(book_id, 100))).data
    assert start["upload_headers"] == {"Content-Type": "image/jpeg"} and start["upload_fields"] == {}
    async with stack.http.put(start["upload_url"], data=b"z" * 101, headers=start["upload_headers"]) as resp:
        assert resp.status == 413  # the signed max_size is the declared size
    assert await stack.objects() == []
    assert await direct_upload(stack, start, b"z" * 99, "image/jpeg") == 201
    error = (await stack.call("POST", f"/photos/{start['photo_id']}/complete", key)).error(400, "VALIDATION_ERROR")
    assert error["details"]["field"] == "size_bytes"
    assert await stack.objects() == []


# -- signed URLs -----------------------------------------------------------------------------


@local_only
async def test_expired_or_tampered_urls_are_refused(make_stack: MakeStack) -> None:
    stack = await make_stack(blob_url_ttl_s=1)
    store = cast(LocalBlobStore, stack.blobs)
    key, book_id = await stack.member()
    ids = [(await stack.upload(key, meta_for(book_id, 5), f"p{n}xyz".encode())).data["photo_id"] for n in range(2)]
    urls = [(await stack.call("GET", f"/photos/{i}", key)).data["download_url"] for i in ids]
    base, _, query_string = urls[0].partition("?")
    query = {k: v[0] for k, v in parse_qs(query_string).items()}
    other_path = urlsplit(urls[1]).path
    sig = query["signature"]
    past = int(time.time()) - 1
    photo_key = urlsplit(base).path.removeprefix("/blobs/")
    forged_expiry = store._sign("GET", photo_key, str(past))  # genuinely signed, but expired
    bad = {
        "tampered signature": f"{base}?{urlencode({**query, 'signature': ('A' if sig[0] != 'A' else 'B') + sig[1:]})}",
        "extended expiry": f"{base}?{urlencode({**query, 'expires': int(query['expires']) + 3600})}",
        "another photo's key": f"http://127.0.0.1:{stack.server.port}{other_path}?{query_string}",
        "no signature": base,
        "expired": f"{base}?{urlencode({'expires': past, 'signature': forged_expiry})}",
    }
    for name, url in bad.items():
        async with stack.http.get(url) as resp:
            body = await resp.json()
            assert (resp.status, body["error"]["code"]) == (403, "FORBIDDEN"), name
    assert await download(stack, urls[0]) == (200, b"p0xyz")
    await asyncio.sleep(2.1)  # BLOB_URL_TTL_S=1: the URL the server gave out has expired now
    async with stack.http.get(urls[0]) as resp:
        assert resp.status == 403 and (await resp.json())["error"]["code"] == "FORBIDDEN"
    # A fresh GET gives a fresh URL.
    fresh = (await stack.call("GET", f"/photos/{ids[0]}", key)).data["download_url"]
    assert await download(stack, fresh) == (200, b"p0xyz")


@s3_only
async def test_s3_urls_are_presigned_for_five_minutes(stack: Stack) -> None:
    key, book_id = await stack.member()
    photo_id = (await stack.upload(key, meta_for(book_id, 3), b"abc")).data["photo_id"]
    query = parse_qs(urlsplit((await stack.call("GET", f"/photos/{photo_id}", key)).data["download_url"]).query)
    assert query["X-Amz-Expires"] == ["300"] and "X-Amz-Signature" in query
    start = (await stack.call("POST", "/photos/upload", key, json=meta_for(book_id, 100))).data
    policy = json.loads(base64.b64decode(start["upload_fields"]["policy"]))
    assert ["content-length-range", 1, 100] in policy["conditions"]
    assert {"key": start["s3_key"]} in policy["conditions"]


# -- membership ------------------------------------------------------------------------------


async def test_only_members_of_the_photos_book(stack: Stack) -> None:
    owner, book_id = await stack.member()
    outsider, own_book = await stack.member()
    photo = (await stack.upload(owner, meta_for(book_id, 5), b"12345")).data
    pending = (await stack.call("POST", "/photos/upload", owner, json=meta_for(book_id, 5))).data
    path = f"/photos/{photo['photo_id']}"
    # Another book's device: forbidden everywhere, and its upload stores nothing.
    (await stack.upload(outsider, meta_for(book_id, 5), b"12345")).error(403, "FORBIDDEN")
    (await stack.call("POST", "/photos/upload", outsider, json=meta_for(book_id, 5))).error(403, "FORBIDDEN")
    (await stack.call("GET", path, outsider)).error(403, "FORBIDDEN")
    (await stack.call("DELETE", path, outsider)).error(403, "FORBIDDEN")
    (await stack.call("POST", f"/photos/{pending['photo_id']}/complete", outsider)).error(403, "FORBIDDEN")
    (await stack.call("POST", f"{path}/complete", outsider)).error(403, "FORBIDDEN")
    # A token bound to its own book may not act on another.
    bound = {"Authorization": f"Bearer {owner.token(book_id=own_book)}"}
    (await stack.call("GET", path, headers=bound)).error(403, "FORBIDDEN")
    # A removed member is an outsider at once.
    removed, _ = await stack.member(book_id)
    assert (await stack.call("GET", path, removed)).status == 200
    await stack.db.execute("UPDATE book_members SET removed_at = $1 WHERE device_id = $2", int(time.time() * 1000), removed.device_id)
    (await stack.call("GET", path, removed)).error(403, "FORBIDDEN")
    (await stack.upload(removed, meta_for(book_id, 5), b"12345")).error(403, "FORBIDDEN")
    # Unknown photos, and callers without a device token.
    for unknown in ("/photos/00000000-0000-0000-0000-000000000000", "/photos/" + "x" * 100):
        (await stack.call("GET", unknown, owner)).error(404, "PHOTO_NOT_FOUND")
        (await stack.call("DELETE", unknown, owner)).error(404, "PHOTO_NOT_FOUND")
        (await stack.call("POST", unknown + "/complete", owner)).error(404, "PHOTO_NOT_FOUND")
    (await stack.call("GET", path)).error(401, "INVALID_TOKEN")
    (await stack.upload(None, meta_for(book_id, 5), b"12345")).error(401, "INVALID_TOKEN")
    assert len(await stack.photo_rows()) == 2 and len(await stack.objects()) == 1


# -- delete ----------------------------------------------------------------------------------


async def test_any_member_deletes_a_photo_and_its_object(stack: Stack) -> None:
    uploader, book_id = await stack.member()
    other, _ = await stack.member(book_id)
    photo = (await stack.upload(uploader, meta_for(book_id, 5), b"12345")).data
    keep = (await stack.upload(uploader, meta_for(book_id, 4), b"keep")).data
    path = f"/photos/{photo['photo_id']}"
    deleted = await stack.call("DELETE", path, other)
    assert deleted.status == 204
    assert await stack.blobs.head(photo["s3_key"]) is None
    assert await stack.objects() == [keep["s3_key"]]
    (await stack.call("GET", path, uploader)).error(404, "PHOTO_NOT_FOUND")
    (await stack.call("DELETE", path, uploader)).error(404, "PHOTO_NOT_FOUND")
    # The transaction is free again.
    # Audited with hashed ids only.
    rows = await stack.db.fetch("SELECT event, subject_hash, user_id, details FROM audit_log WHERE event = 'photo.deleted'")
    assert len(rows) == 1
    assert rows[0]["subject_hash"] == hash_id(photo["photo_id"]) and rows[0]["user_id"] is None
    details = json.loads(rows[0]["details"])
    assert details == {"book": hash_id(book_id), "device": hash_id(str(other.device_id)), "state": "ready"}
    everything = json.dumps([dict(r) for r in await stack.db.fetch("SELECT * FROM audit_log")])
    assert book_id not in everything and photo["photo_id"] not in everything and str(other.device_id) not in everything
    # A pending photo with its object uploaded but not completed goes the same way.
    start = (await stack.call("POST", "/photos/upload", uploader, json=meta_for(book_id, 3))).data
    assert await direct_upload(stack, start, b"abc", "image/jpeg") in (200, 201, 204)
    assert (await stack.call("DELETE", f"/photos/{start['photo_id']}", uploader)).status == 204
    assert await stack.objects() == [keep["s3_key"]]
    assert [r["id"] for r in await stack.photo_rows()] == [keep["photo_id"]]


# -- the seed's per-device limits ----------------------------------------------------------


async def test_uploads_are_limited_per_device_and_paid_books_get_more(make_stack: MakeStack) -> None:
    stack = await make_stack(rate_photo_upload="2/86400")
    key, book_id = await stack.member()
    assert (await stack.upload(key, meta_for(book_id, 3), b"abc")).status == 201
    assert (await stack.call("POST", "/photos/upload", key, json=meta_for(book_id, 3))).status == 201
    refused = await stack.upload(key, meta_for(book_id, 3), b"abc")
    refused.error(429, "RATE_LIMIT_EXCEEDED")
    assert refused.headers["X-RateLimit-Limit"] == "2"
    assert refused.headers["X-RateLimit-Remaining"] == "0"
    assert int(refused.headers["X-RateLimit-Reset"]) > time.time()
    assert int(refused.headers["Retry-After"]) > 0
    (await stack.call("POST", "/photos/upload", key, json=meta_for(book_id, 3))).error(429, "RATE_LIMIT_EXCEEDED")
    assert len(await stack.photo_rows()) == 2
    # Another device has its own quota.
    other, _ = await stack.member(book_id)
    assert (await stack.upload(other, meta_for(book_id, 3), b"abc")).status == 201
    # A paid book: RATE_PHOTO_UPLOAD_PAID (1000/day) applies. A fresh device: the GCRA bucket is
    # per device and shared by both tiers (api/book_access.py), so the 2 free uploads above put
    # this device's bucket a whole day ahead, which the paid limit reads as 1000 uploads spent.
    paid_key, paid_book = await stack.member()
    await stack.db.execute("UPDATE books SET tier = 'paid' WHERE id = $1", paid_book)
    for _ in range(4):
        assert (await stack.upload(paid_key, meta_for(paid_book, 3), b"abc")).status == 201


async def test_downloads_are_limited_per_device_and_unlimited_on_paid_books(make_stack: MakeStack) -> None:
    stack = await make_stack(rate_photo_get="2/86400")
    key, book_id = await stack.member()
    path = f"/photos/{(await stack.upload(key, meta_for(book_id, 3), b'abc')).data['photo_id']}"
    for _ in range(2):
        assert (await stack.call("GET", path, key)).status == 200
    refused = await stack.call("GET", path, key)
    refused.error(429, "RATE_LIMIT_EXCEEDED")
    assert refused.headers["X-RateLimit-Limit"] == "2" and int(refused.headers["Retry-After"]) > 0
    await stack.db.execute("UPDATE books SET tier = 'paid' WHERE id = $1", book_id)
    for _ in range(5):
        assert (await stack.call("GET", path, key)).status == 200


async def test_an_abandoned_direct_upload_is_swept_by_the_prune_pass(stack: Stack) -> None:
    from relay import book_relay
    from shared.books.sweep import ABANDONED_AFTER_MS

    key, book_id = await stack.member()
    data = os.urandom(1000)
    fresh = (await stack.call("POST", "/photos/upload", key, json=meta_for(book_id, len(data)))).data
    old = (await stack.call("POST", "/photos/upload", key, json=meta_for(book_id, len(data)))).data
    assert await direct_upload(stack, old, data, "image/jpeg") in (200, 201, 204)  # never completed
    await stack.db.execute("UPDATE photos SET created_at = created_at - $1 WHERE id = $2",
                           ABANDONED_AFTER_MS + 1000, old["photo_id"])
    await book_relay.for_state(stack.server.state).prune()
    assert [r["id"] for r in await stack.photo_rows()] == [fresh["photo_id"]]  # the recent one stays
    assert old["s3_key"] not in await stack.objects()
