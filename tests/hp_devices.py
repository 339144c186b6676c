"""A simulated Home Pocket device (seed section 4.1, "zero-knowledge"), for end-to-end tests.

It does what the app does, with real parts only:

* an Ed25519 identity (``tests.device_helpers.DeviceKey``), registered through
  ``POST /api/v1/devices/register``; it signs its own device JWTs;
* a Yjs document (pycrdt ``Doc`` with a ``text`` and a ``map`` root);
* a 32-byte book key in a ``nacl.secret.SecretBox`` (XSalsa20-Poly1305): every local change is the
  ``get_update`` diff against the state vector before it, encrypted with the book key and sent as a
  ``crdt_operation`` over ``/ws/relay/{book_id}`` (JSON or the ``switchboard.v1.msgpack`` codec);
  received ops are deduplicated by ``seq``, decrypted and applied;
* key distribution the Home Pocket way: the device holding the book key seals it to a peer's
  public key (Ed25519 converted to Curve25519, ``nacl.public.SealedBox``) and sends the sealed box
  through the relay as one more opaque op. The server only ever sees ciphertext.

The op payload is ``kind byte || ciphertext``: ``K`` a sealed book key (whoever cannot open it
ignores it), ``U`` a SecretBox-encrypted Yjs update. Updates that arrive before the key are kept
and applied once it does.

    device = HPDevice("a")
    await device.register(http)                 # aiohttp session on the server's base URL
    book_id = await device.create_book(http)    # POST /api/v1/books; makes the book key
    await device.connect(server_port, book_id)
    await device.share_key_with(other.public_key)
    await device.edit(lambda doc: ...)          # local change -> encrypted op, acked
    await device.close()
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import msgpack
import nacl.exceptions
import nacl.public
import nacl.secret
import nacl.signing
import nacl.utils
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from pycrdt import Doc, Map, Text
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from tests.device_helpers import DeviceKey

MSGPACK = "switchboard.v1.msgpack"
KIND_KEY = b"K"  # a book key sealed to one member's public key
KIND_UPDATE = b"U"  # a Yjs update encrypted with the book key
TIMEOUT = 10.0
CLIENT_LOGGER = "tests.hp_devices.ws"  # the devices' own websockets logger (not the server's)


class HPDevice:
    """One device: identity, document, book key, relay socket."""

    def __init__(self, name: str, *, binary: bool = False) -> None:
        self.name = name
        self.binary = binary  # msgpack codec (raw bytes payloads) instead of JSON (base64)
        self.identity = DeviceKey()
        seed = self.identity.private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        self.signing = nacl.signing.SigningKey(seed)  # the same Ed25519 key, as PyNaCl sees it
        self.doc: Doc[Any] = Doc()
        self.text = self.doc.get("text", type=Text)
        self.map = self.doc.get("map", type=Map)
        self.book_id: str | None = None
        self.book_key: bytes | None = None
        self._box: nacl.secret.SecretBox | None = None
        self.ws: ClientConnection | None = None
        self.synced_seq: int | None = None
        self.closed = False  # the server closed the socket
        self.seen_seqs: set[int] = set()
        self.duplicates = 0  # ops dropped because their seq was already applied
        self.pending: list[bytes] = []  # encrypted updates that came before the book key
        self.sent: list[bytes] = []  # every payload this device sent (ciphertext), in order
        self.frames: list[dict[str, Any]] = []  # every frame read
        self._acks: dict[str, asyncio.Future[int]] = {}
        self._op_counter = 0
        self._reader: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()

    # -- identity ----------------------------------------------------------------------------------
    @property
    def device_id(self) -> str:
        assert self.identity.device_id is not None, "register first"
        return self.identity.device_id

    @property
    def public_key(self) -> bytes:
        """The raw Ed25519 public key (what pairing hands to the peer)."""
        return bytes(self.signing.verify_key)

    def token(self) -> str:
        return self.identity.token()

    def _auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token()}"}

    async def register(self, http: aiohttp.ClientSession) -> str:
        """``POST /api/v1/devices/register`` (proof of possession); the device id."""
        body = self.identity.register_body(name=self.name)
        resp = await http.post("/api/v1/devices/register", json=body)
        body = await resp.json()
        assert resp.status == 201 and body["success"], body
        self.identity.device_id = str(body["data"]["device_id"])
        return self.identity.device_id

    async def create_book(self, http: aiohttp.ClientSession) -> str:
        """``POST /api/v1/books``: this device is the first member; the book key is made here."""
        resp = await http.post("/api/v1/books", headers=self._auth())
        body = await resp.json()
        assert resp.status == 201 and body["success"], body
        self.book_id = str(body["data"]["book_id"])
        self._set_key(nacl.utils.random(nacl.secret.SecretBox.KEY_SIZE))
        return self.book_id

    async def pairing_code(self, http: aiohttp.ClientSession, book_id: str) -> str:
        """``POST /api/v1/pairing/generate``: a six-digit code for a new device to join."""
        resp = await http.post("/api/v1/pairing/generate", json={"book_id": book_id}, headers=self._auth())
        body = await resp.json()
        assert resp.status == 201 and body["success"], body
        return str(body["data"]["short_code"])

    async def join(self, http: aiohttp.ClientSession, code: str) -> bytes:
        """``POST /api/v1/pairing/verify``: join the code's book; the generator's public key."""
        resp = await http.post("/api/v1/pairing/verify", headers=self._auth(), json={
            "short_code": code, "public_key": base64.b64encode(self.public_key).decode()})
        body = await resp.json()
        assert resp.status == 200 and body["data"]["matched"] is True, body
        self.book_id = str(body["data"]["book_id"])
        return base64.b64decode(body["data"]["peer_public_key"])

    # -- photos and snapshots: ciphertext through the blob store --------------------------------------
    async def upload_photo(self, http: aiohttp.ClientSession, photo: bytes) -> str:
        """Encrypt ``photo`` with the book key and upload it (multipart, streamed); its id."""
        assert self._box is not None and self.book_id is not None
        sealed = bytes(self._box.encrypt(photo))
        form = aiohttp.FormData()
        form.add_field("metadata", json.dumps({"book_id": self.book_id, "transaction_id": f"tx-{self.name}",
                                               "size_bytes": len(sealed), "mime_type": "image/jpeg"}),
                       content_type="application/json")
        form.add_field("file", sealed, filename="photo.enc", content_type="image/jpeg")
        resp = await http.post("/api/v1/photos/upload", data=form, headers=self._auth())
        body = await resp.json()
        assert resp.status == 201, body
        return str(body["data"]["photo_id"])

    async def download_photo(self, http: aiohttp.ClientSession, photo_id: str) -> bytes:
        """``GET /photos/{id}``, fetch its URL, decrypt."""
        assert self._box is not None
        resp = await http.get(f"/api/v1/photos/{photo_id}", headers=self._auth())
        body = await resp.json()
        assert resp.status == 200, body
        async with aiohttp.ClientSession() as raw, raw.get(body["data"]["download_url"]) as got:
            assert got.status == 200
            return bytes(self._box.decrypt(await got.read()))

    async def upload_snapshot(self, http: aiohttp.ClientSession, seq: int) -> None:
        """The whole document, encrypted, as the book's snapshot up to ``seq`` (the first one)."""
        assert self._box is not None and self.book_id is not None
        form = aiohttp.FormData()
        form.add_field("metadata", json.dumps({"seq": seq, "base_snapshot_seq": None}),
                       content_type="application/json")
        form.add_field("file", bytes(self._box.encrypt(self.doc.get_update())), filename="snapshot.enc")
        resp = await http.put(f"/api/v1/books/{self.book_id}/snapshot", data=form, headers=self._auth())
        assert resp.status == 200, await resp.text()

    async def restore_snapshot(self, http: aiohttp.ClientSession) -> int:
        """Download the book's snapshot, decrypt and apply it; its seq."""
        assert self._box is not None
        resp = await http.get(f"/api/v1/books/{self.book_id}/snapshot", headers=self._auth())
        body = await resp.json()
        assert resp.status == 200, body
        async with aiohttp.ClientSession() as raw, raw.get(body["data"]["download_url"]) as got:
            self.doc.apply_update(bytes(self._box.decrypt(await got.read())))
        return int(body["data"]["seq"])

    # -- keys ---------------------------------------------------------------------------------------
    def _set_key(self, key: bytes) -> None:
        assert len(key) == nacl.secret.SecretBox.KEY_SIZE
        self.book_key = key
        self._box = nacl.secret.SecretBox(key)
        pending, self.pending = self.pending, []
        for ciphertext in pending:
            self._apply(ciphertext)

    def seal_book_key(self, peer_public_key: bytes) -> bytes:
        """The book key sealed to a peer's Ed25519 public key (converted to Curve25519)."""
        assert self.book_key is not None, "no book key yet"
        curve = nacl.signing.VerifyKey(peer_public_key).to_curve25519_public_key()
        return KIND_KEY + nacl.public.SealedBox(curve).encrypt(self.book_key)

    async def share_key_with(self, peer_public_key: bytes) -> int:
        """Send the sealed book key through the relay, as an ordinary op; its seq."""
        return await self.send_op(self.seal_book_key(peer_public_key))

    @property
    def has_key(self) -> bool:
        return self._box is not None

    # -- the relay socket ----------------------------------------------------------------------------
    async def connect(self, port: int, book_id: str) -> None:
        """Open ``/ws/relay/{book_id}``, check ``presence`` then ``synced``, start reading."""
        self.book_id = book_id
        self.ws = await connect(
            f"ws://127.0.0.1:{port}/ws/relay/{book_id}",
            additional_headers=self._auth(),
            subprotocols=[MSGPACK] if self.binary else None,  # type: ignore[list-item]
            open_timeout=TIMEOUT,
            logger=logging.getLogger(CLIENT_LOGGER),
        )
        assert (self.ws.subprotocol == MSGPACK) == self.binary, self.ws.subprotocol
        presence = await self._recv()
        assert presence["type"] == "presence" and self.device_id in presence["online"], presence
        # An op published while the server read the head may come before ``synced`` (dedupe by seq).
        while True:
            frame = await self._recv()
            if frame["type"] == "synced":
                self.synced_seq = int(frame["seq"])
                break
            self._handle(frame)
        self._reader = asyncio.create_task(self._read_forever(), name=f"hp-device-{self.name}")

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
            self._reader = None

    async def _recv(self) -> dict[str, Any]:
        assert self.ws is not None
        data = await asyncio.wait_for(self.ws.recv(), TIMEOUT)
        if self.binary:
            assert isinstance(data, bytes), "a msgpack peer gets binary frames"
            frame: dict[str, Any] = msgpack.unpackb(data, raw=False)
        else:
            assert isinstance(data, str), "a JSON peer gets text frames"
            frame = json.loads(data)
        self.frames.append(frame)
        return frame

    async def _send(self, frame: dict[str, Any]) -> None:
        assert self.ws is not None, "connect first"
        data = msgpack.packb(frame, use_bin_type=True) if self.binary else json.dumps(frame)
        await self.ws.send(data)

    async def _read_forever(self) -> None:
        assert self.ws is not None
        while True:
            try:
                data = await self.ws.recv()
            except ConnectionClosed:
                self.closed = True
                self._changed.set()
                return
            frame = msgpack.unpackb(data, raw=False) if self.binary else json.loads(data)
            self.frames.append(frame)
            self._handle(frame)

    def _handle(self, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        if kind == "ack":
            future = self._acks.pop(str(frame["id"]), None)
            if future is not None and not future.done():
                future.set_result(int(frame["seq"]))
        elif kind == "error":
            future = self._acks.pop(str(frame.get("id")), None)
            if future is not None and not future.done():
                future.set_exception(AssertionError(f"{self.name}: op refused: {frame}"))
        elif kind == "crdt_operation":
            seq = int(frame["seq"])
            if seq in self.seen_seqs:
                self.duplicates += 1
                return
            self.seen_seqs.add(seq)
            payload = frame["payload"]
            raw = payload if self.binary else base64.b64decode(payload, validate=True)
            assert isinstance(raw, bytes)
            self._receive(raw)
        self._changed.set()

    # -- ops ----------------------------------------------------------------------------------------
    async def send_op(self, payload: bytes) -> int:
        """Send one opaque op and wait for its ack; its seq."""
        self._op_counter += 1
        op_id = f"{self.name}-{self._op_counter}"
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._acks[op_id] = future
        frame = {
            "type": "crdt_operation",
            "id": op_id,
            "payload": payload if self.binary else base64.b64encode(payload).decode(),
            "timestamp": int(time.time()),
        }
        self.sent.append(payload)
        await self._send(frame)
        seq = await asyncio.wait_for(future, TIMEOUT)
        self.seen_seqs.add(seq)  # our own op: never applied twice if it ever came back
        return seq

    async def edit(self, change: Callable[[HPDevice], None]) -> int:
        """Run ``change`` on the document, send its update encrypted; the op's seq."""
        assert self._box is not None, f"{self.name} has no book key yet"
        before = self.doc.get_state()
        with self.doc.transaction():
            change(self)
        update = self.doc.get_update(before)
        return await self.send_op(KIND_UPDATE + self._box.encrypt(update))

    def _receive(self, payload: bytes) -> None:
        kind, body = payload[:1], payload[1:]
        if kind == KIND_KEY:
            if self._box is not None:
                return  # a key sealed to someone else (or to us again)
            private = self.signing.to_curve25519_private_key()
            try:
                key = nacl.public.SealedBox(private).decrypt(body)
            except nacl.exceptions.CryptoError:
                return  # sealed to another member
            self._set_key(key)
        elif kind == KIND_UPDATE:
            if self._box is None:
                self.pending.append(body)
            else:
                self._apply(body)
        else:
            raise AssertionError(f"{self.name}: unknown op kind {kind!r}")

    def _apply(self, ciphertext: bytes) -> None:
        assert self._box is not None
        self.doc.apply_update(self._box.decrypt(ciphertext))

    async def wait_until(self, predicate: Callable[[], bool], timeout: float = TIMEOUT) -> None:
        """Wait (reading in the background) until ``predicate()`` holds."""
        async with asyncio.timeout(timeout):
            while not predicate():
                self._changed.clear()
                await self._changed.wait()

    # -- the document ---------------------------------------------------------------------------------
    def state_vector(self) -> dict[int, int]:
        """The document's state vector, ``{client id: clock}`` (its encoding's order is arbitrary)."""
        return decode_state_vector(self.doc.get_state())

    def contents(self) -> dict[str, Any]:
        """What the user sees: the text and the map (plain Python values)."""
        return {"text": str(self.text), "map": self.map.to_py()}


def decode_state_vector(data: bytes) -> dict[int, int]:
    """A Yjs v1 state vector: varuint count, then (client, clock) varuint pairs."""
    pos = 0

    def varuint() -> int:
        nonlocal pos
        value, shift = 0, 0
        while True:
            byte = data[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            if byte < 0x80:
                return value
            shift += 7

    count = varuint()
    vector = {}
    for _ in range(count):
        client = varuint()
        vector[client] = varuint()
    assert pos == len(data), "trailing bytes after the state vector"
    return vector
