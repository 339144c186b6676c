"""E2EE device helpers for the tests, written from the contract (README "Device JWT", rest.md
``POST /devices/register``): an Ed25519 key, the registration body, self-signed device JWTs, and
store shortcuts for tests about something else (the API way to join a book is pairing)."""

from __future__ import annotations

import base64
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from shared.store.base import Executor


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@dataclass
class DeviceKey:
    private: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate)
    device_id: str | None = None  # set once registered

    @property
    def public_raw(self) -> bytes:
        return self.private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    @property
    def public_b64(self) -> str:
        return b64(self.public_raw)

    def register_body(self, timestamp: int | None = None, **overrides: Any) -> dict[str, Any]:
        """A valid ``/devices/register`` body; ``overrides`` replace fields after signing."""
        ts = int(time.time()) if timestamp is None else timestamp
        signature = self.private.sign(f"register:{self.public_b64}:{ts}".encode())
        body: dict[str, Any] = {
            "public_key": self.public_b64, "platform": "ios", "name": "phone",
            "timestamp": ts, "signature": b64(signature),
        }
        body.update(overrides)
        return body

    def token(
        self, book_id: str | None = None, *, iat: int | None = None, ttl: int = 3600,
        sub: str | None = None, claims: dict[str, Any] | None = None, drop: tuple[str, ...] = (),
    ) -> str:
        """A device JWT signed with this key (EdDSA)."""
        now = int(time.time()) if iat is None else iat
        payload: dict[str, Any] = {"sub": sub or self.device_id, "iat": now, "exp": now + ttl}
        if book_id is not None:
            payload["book_id"] = book_id
        payload.update(claims or {})
        for name in drop:
            payload.pop(name, None)
        return jwt.encode(payload, self.private, algorithm="EdDSA")


async def insert_device(db: Executor, key: DeviceKey | None = None) -> DeviceKey:
    """A registered device, straight into the store (for tests about something else)."""
    key = key or DeviceKey()
    key.device_id = str(uuid.uuid4())
    await db.execute(
        "INSERT INTO devices (id, public_key, platform, created_at) VALUES ($1, $2, 'test', $3)",
        key.device_id, key.public_b64, int(time.time() * 1000),
    )
    return key


async def add_member(db: Executor, book_id: str, device_id: str) -> None:
    """A member straight into the store (tests about something else; the API way is pairing)."""
    await db.execute(
        "INSERT INTO book_members (book_id, device_id, joined_at) VALUES ($1, $2, $3)",
        book_id, device_id, int(time.time() * 1000),
    )


async def insert_book(db: Executor, *members: DeviceKey) -> str:
    """A book created by the first member, with the others added."""
    book_id = str(uuid.uuid4())
    creator = members[0].device_id
    await db.execute(
        "INSERT INTO books (id, created_by_device, created_at) VALUES ($1, $2, $3)",
        book_id, creator, int(time.time() * 1000),
    )
    for member in members:
        assert member.device_id is not None
        await add_member(db, book_id, member.device_id)
    return book_id
