"""Switchboard benchmark setup: devices, books, memberships and device JWTs for a layout.

A benchmark socket on ``/ws/relay/{book_id}`` needs a registered E2EE device that is a member of
the book, and a device JWT it signed itself. For a layout of C channels x S subscribers (plus one
publisher per channel) the setup makes, against a running server:

* a pool of devices, one per socket: subscriber ``i`` (0..C*S-1, channel ``i // S``) is device
  ``i``, the publisher of channel ``ch`` is device ``C*S + ch``. Registered through the API
  (``POST /api/v1/devices/register``, Ed25519 proof of possession), 64 requests in flight;
* one book per channel, created through the API (``POST /api/v1/books``) by the channel's
  publisher device, which becomes its first member;
* the subscribers' memberships, written straight into the store (``book_members``): pairing, the
  normal way to join a book, does not exist yet (tests/device_helpers.py does the same).

The devices and books live in the server's DATA_DIR (SQLite) and are reused by later trials and
runs: ``bench-manifest.json`` there lists the device ids with their private keys (benchmark keys,
nothing else) and the books per layout. Device JWTs are signed fresh at every run (12 h).
"""

from __future__ import annotations

import asyncio
import base64
import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

MANIFEST = "bench-manifest.json"
TOKEN_TTL_S = 12 * 3600


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _key(seed_b64: str) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(base64.b64decode(seed_b64))


def layout_key(channels: int, subs: int) -> str:
    return f"{channels}x{subs}"


class Manifest:
    def __init__(self, path: Path) -> None:
        self.path = path
        data: dict[str, Any] = {"devices": [], "books": {}}
        if path.exists():
            data = json.loads(path.read_text())
        self.devices: list[list[str]] = data["devices"]  # [device_id, private seed b64]
        self.books: dict[str, list[str]] = data["books"]

    def save(self) -> None:
        tmp = self.path.with_suffix(".part")
        tmp.write_text(json.dumps({"devices": self.devices, "books": self.books}))
        tmp.replace(self.path)


def device_token(device_id: str, seed_b64: str, now: int) -> str:
    payload = {"sub": device_id, "iat": now, "exp": now + TOKEN_TTL_S}
    return jwt.encode(payload, _key(seed_b64), algorithm="EdDSA")


async def _register(session: Any, base: str, key: Ed25519PrivateKey) -> str:
    public = _b64(key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))
    ts = int(time.time())
    body = {
        "public_key": public,
        "platform": "bench",
        "name": "bench",
        "timestamp": ts,
        "signature": _b64(key.sign(f"register:{public}:{ts}".encode())),
    }
    async with session.post(f"{base}/api/v1/devices/register", json=body) as resp:
        data = await resp.json()
        if resp.status not in (200, 201):
            raise RuntimeError(f"device registration failed: {resp.status} {data}")
        return str(data["data"]["device_id"])


async def _create_book(session: Any, base: str, token: str) -> str:
    headers = {"Authorization": f"Bearer {token}"}
    async with session.post(f"{base}/api/v1/books", headers=headers) as resp:
        data = await resp.json()
        if resp.status != 201:
            raise RuntimeError(f"book creation failed: {resp.status} {data}")
        return str(data["data"]["book_id"])


async def _bounded(coros: list[Any], limit: int = 64) -> list[Any]:
    sem = asyncio.Semaphore(limit)

    async def one(c: Any) -> Any:
        async with sem:
            return await c

    return list(await asyncio.gather(*(one(c) for c in coros)))


async def ensure(
    base_url: str, data_dir: Path, layouts: list[tuple[int, int]], log: Any = print
) -> Manifest:
    """Make sure the pool and the books of every ``(channels, subs)`` layout exist."""
    import aiohttp

    manifest = Manifest(data_dir / MANIFEST)
    need = max((c * s + c for c, s in layouts), default=0)
    async with aiohttp.ClientSession() as session:
        missing = need - len(manifest.devices)
        if missing > 0:
            t0 = time.perf_counter()
            keys = [Ed25519PrivateKey.generate() for _ in range(missing)]
            ids = await _bounded([_register(session, base_url, k) for k in keys])
            for key, device_id in zip(keys, ids, strict=True):
                manifest.devices.append([device_id, _b64(key.private_bytes_raw())])
            manifest.save()
            log(f"  setup: registered {missing} devices in {time.perf_counter() - t0:.1f}s")
        now = int(time.time())
        for channels, subs in layouts:
            lk = layout_key(channels, subs)
            if lk in manifest.books and len(manifest.books[lk]) == channels:
                continue
            t0 = time.perf_counter()
            creators = [manifest.devices[channels * subs + ch] for ch in range(channels)]
            books = await _bounded(
                [_create_book(session, base_url, device_token(d, s, now)) for d, s in creators]
            )
            _add_members(data_dir, manifest, books, subs)
            manifest.books[lk] = books
            manifest.save()
            log(
                f"  setup: {channels} books x {subs} members + creator in"
                f" {time.perf_counter() - t0:.1f}s"
            )
    return manifest


def _add_members(data_dir: Path, manifest: Manifest, books: list[str], subs: int) -> None:
    """The subscribers' memberships, straight into the store (no pairing API yet)."""
    now = int(time.time() * 1000)
    rows = [
        (book, manifest.devices[ch * subs + k][0], now)
        for ch, book in enumerate(books)
        for k in range(subs)
    ]
    db = sqlite3.connect(data_dir / "switchboard.db", timeout=30)
    try:
        db.executemany(
            "INSERT OR IGNORE INTO book_members (book_id, device_id, joined_at) VALUES (?, ?, ?)",
            rows,
        )
        db.commit()
    finally:
        db.close()


def tokens(manifest: Manifest, count: int) -> list[str]:
    """Fresh device JWTs for the first ``count`` devices of the pool."""
    now = int(time.time())
    return [device_token(d, s, now) for d, s in manifest.devices[:count]]
