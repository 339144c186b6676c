"""An end-to-end encrypted chat over the book relay, with the client SDK.

With ``make run`` in another terminal::

    # a new device (key kept in chat-device.json), a new book, then chat in it
    .venv/bin/python examples/book_relay_chat.py --create --secret 'our family passphrase'
    # the same (or another member) device in an existing book
    .venv/bin/python examples/book_relay_chat.py --book BOOK_ID --secret 'our family passphrase'

Lines typed on stdin are encrypted here (NaCl SecretBox, key derived from ``--secret``) and sent
as ``crdt_operation`` payloads: the relay only ever sees ciphertext. Each line waits for its ack
and shows its seq; lines from the other devices of the book are decrypted and shown with theirs.
The device registers itself (``POST /devices/register`` with an Ed25519 proof) and signs its own
JWTs: the token getter mints a fresh one for every connection. Other devices join a book by
pairing (``POST /pairing/generate`` / ``/pairing/verify``, rest.md) once the server has it.
Kill the server and start it again: the chat reconnects by itself and re-sends unacked lines.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import jwt
from nacl.exceptions import CryptoError
from nacl.secret import SecretBox
from nacl.signing import SigningKey

from relay.client import BookClient, FileCursorStore, Op, Reset


class Device:
    """An E2EE device: an Ed25519 key in a file, registered once, signing its own JWTs."""

    def __init__(self, path: Path) -> None:
        self.path = path
        saved = json.loads(path.read_text()) if path.exists() else {}
        seed = base64.b64decode(saved["seed"]) if "seed" in saved else SigningKey.generate().encode()
        self.key = SigningKey(seed)
        self.device_id: str | None = saved.get("device_id")
        self.public_b64 = base64.b64encode(bytes(self.key.verify_key)).decode()

    def save(self) -> None:
        self.path.write_text(json.dumps({"seed": base64.b64encode(self.key.encode()).decode(),
                                         "device_id": self.device_id}))

    async def register(self, http: aiohttp.ClientSession, api: str) -> None:
        if self.device_id is not None:
            return
        ts = int(time.time())
        signature = self.key.sign(f"register:{self.public_b64}:{ts}".encode()).signature
        body = {"public_key": self.public_b64, "platform": "cli", "name": "book_relay_chat", "timestamp": ts,
                "signature": base64.b64encode(signature).decode()}
        data = await post(http, api + "/devices/register", body)
        self.device_id = data["device_id"]
        self.save()

    def token(self) -> str:
        """A fresh device JWT (1 hour), signed with the device key: the SDK's token getter."""
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        now = int(time.time())
        private = Ed25519PrivateKey.from_private_bytes(self.key.encode())
        return jwt.encode({"sub": self.device_id, "iat": now, "exp": now + 3600}, private, algorithm="EdDSA")


async def post(http: aiohttp.ClientSession, url: str, body: dict[str, Any], token: str | None = None) -> Any:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with http.post(url, json=body, headers=headers) as resp:
        answer = await resp.json()
    if not answer.get("success"):
        raise SystemExit(f"{url}: {answer['error']['code']}: {answer['error']['message']}")
    return answer["data"]


async def read_lines() -> Any:
    """stdin lines without blocking the loop."""
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            return
        yield line.rstrip("\n")


async def main(args: argparse.Namespace) -> None:
    api = args.url.rstrip("/") + "/api/v1"
    box = SecretBox(hashlib.blake2b(args.secret.encode(), digest_size=32, person=b"sb-chat").digest())
    device = Device(Path(args.device_file))
    async with aiohttp.ClientSession() as http:
        await device.register(http, api)
        book_id = args.book
        if args.create:
            book_id = (await post(http, api + "/books", {}, device.token()))["book_id"]
            print(f"created book {book_id}")
        print(f"device {device.device_id}; type a line and press Enter")

    def on_reset(reset: Reset) -> None:
        print(f"! the relay lost history ({reset.reason}): exchange state with your peers")

    def on_notice(frame: dict[str, Any]) -> None:
        if frame["type"] in ("presence", "device.online", "device.offline"):
            print(f"~ {frame['type']}: {frame.get('online') or frame.get('device_id')}")

    book = BookClient(args.url, book_id, token=device.token, store=FileCursorStore(args.cursor_file),
                      on_reset=on_reset, on_notice=on_notice)

    async def show(op: Op) -> None:
        try:
            text = box.decrypt(op.payload).decode()
        except CryptoError:
            text = "<cannot decrypt: another passphrase?>"
        print(f"[{op.seq}] {op.device_id[:8] if op.device_id else '?'}: {text}")

    async def type_lines() -> None:
        async for line in read_lines():
            if line:
                seq = await book.send_op(box.encrypt(line.encode()))
                print(f"[{seq}] me: {line}")
        await book.close(processed=True)

    async with book:
        typing = asyncio.ensure_future(type_lines())
        try:
            await book.run(show)
        finally:
            typing.cancel()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://localhost:8080", help="the server (default %(default)s)")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--book", help="an existing book this device is a member of")
    where.add_argument("--create", action="store_true", help="create a new book")
    parser.add_argument("--secret", required=True, help="passphrase the book's devices share (the key)")
    parser.add_argument("--device-file", default="chat-device.json", help="this device's key and id")
    parser.add_argument("--cursor-file", default="chat-cursor.json", help="where the last seq is kept")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main(parser.parse_args()))
