"""Devices, books and memberships for the book relay mix, before anything is measured.

Layout: ``books`` ordinary books of ``per_book`` devices each, plus one hot book of ``hot``
devices (the last book). Every socket is its own E2EE device:

* registered through the API (``POST /api/v1/devices/register``, Ed25519 proof of possession,
  64 requests in flight; bench/loadgen/sbsetup.py's helpers);
* each book created through the API (``POST /api/v1/books``) by its first device, which becomes
  its first member;
* the other members written straight into the store (``book_members``, through the project's
  own ``shared.store`` so SQLite and PostgreSQL take the same SQL): pairing, the normal way to
  join a book, is not on main yet (tests/device_helpers.py ``add_member`` does the same).

Device JWTs (EdDSA, 12 h, no book binding) are signed fresh per trial by the control process.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from loadgen.sbsetup import _b64, _bounded, _create_book, _register, device_token


@dataclass(frozen=True)
class Member:
    index: int  # global device index (the sender id inside every payload)
    device_id: str
    token: str
    book: int  # book index; the hot book is the last one
    members: int  # devices in that book


@dataclass(frozen=True)
class Layout:
    books: list[str]
    members: list[Member]
    hot_book: int  # index of the hot book, -1 without one
    register_s: float
    books_s: float


def book_sizes(books: int, per_book: int, hot: int) -> list[int]:
    return [per_book] * books + ([hot] if hot > 0 else [])


async def build(
    base_url: str, db_url: str, schema: str, books: int, per_book: int, hot: int
) -> Layout:
    import aiohttp

    from shared.store import open_database

    sizes = book_sizes(books, per_book, hot)
    owner = [b for b, n in enumerate(sizes) for _ in range(n)]
    keys = [Ed25519PrivateKey.generate() for _ in owner]
    seeds = [_b64(k.private_bytes_raw()) for k in keys]
    firsts = [sum(sizes[:b]) for b in range(len(sizes))]
    async with aiohttp.ClientSession() as session:
        t0 = time.perf_counter()
        ids = await _bounded([_register(session, base_url, k) for k in keys])
        register_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        now = int(time.time())
        book_ids = await _bounded(
            [_create_book(session, base_url, device_token(ids[i], seeds[i], now)) for i in firsts]
        )
    rows = [
        (book_ids[b], ids[i], int(time.time() * 1000))
        for i, b in enumerate(owner)
        if i != firsts[b]
    ]
    db = await open_database(db_url, schema=schema, migrate=False)
    try:
        await db.executemany(
            "INSERT INTO book_members (book_id, device_id, joined_at) VALUES ($1, $2, $3)", rows
        )
    finally:
        await db.close()
    books_s = time.perf_counter() - t0
    now = int(time.time())
    members = [
        Member(i, ids[i], device_token(ids[i], seeds[i], now), b, sizes[b])
        for i, b in enumerate(owner)
    ]
    return Layout(book_ids, members, len(sizes) - 1 if hot > 0 else -1, register_s, books_s)


def describe(layout: Layout) -> dict[str, Any]:
    return {
        "books": len(layout.books),
        "devices": len(layout.members),
        "hot_book_devices": (
            sum(1 for m in layout.members if m.book == layout.hot_book)
            if layout.hot_book >= 0
            else 0
        ),
        "register_seconds": round(layout.register_s, 1),
        "books_and_members_seconds": round(layout.books_s, 1),
    }
