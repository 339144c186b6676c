"""Home Pocket pairing codes (rest.md ``/pairing/generate|verify|exchange``): the code store.

A member device asks for a six-digit code for a book; a new device types it in and joins the
book. This package keeps the codes; ``api.routes.pairing`` does the HTTP, the limits, the join and
the ``pairing.matched`` push. Two backends behind one ``CodeStore`` protocol:

* ``RedisCodeStore`` (``shared.pairing.redis``) when ``REDIS_URL`` is set: one hash per code,
  created with a script that refuses an existing key and expires by itself;
* ``SqlCodeStore`` (``shared.pairing.sql``) otherwise: the ``pairing_codes`` table (migration
  0006), on SQLite or PostgreSQL.

A record lives until ``keep_until``: while the code is live (``expires_at``), then for
``LINGER_S`` (5 minutes, rest.md) after the match or the expiry, so the generating device can still
ask ``/pairing/exchange`` how it ended. A lingering record still holds its code, so a new code is
unique among every record kept, live codes included.

Codes are never stored: the key is ``digest(key, code)``, an HMAC-SHA256 under a key derived from
the server secret (``JWT_SECRET`` or ``DATA_DIR/jwt_secret``), never under the store. A plain hash
of a 10^6 space is reversed by trying every code; the HMAC is not, for someone who has the store
(a Redis key listing, a database dump) but not the secret. It also keeps codes out of key
listings and logs.

Single use: ``mark_matched`` is a compare-and-set from ``pending`` (one SQL ``UPDATE ... WHERE
state = 'pending'``, one Lua script on Redis), so of two verifications of one code exactly one
wins. ``classify`` is the one place that decides what a verification of a record means; the
backends only read and swap.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from typing import Protocol

from shared.config import Settings
from shared.store.base import Database, Executor

CODE_DIGITS = 6
LINGER_S = 300  # rest.md: exchange "answers for 5 minutes after the match or the expiry"
_CODE = re.compile(r"[0-9]{6}")  # ASCII digits only ("\d" would take other scripts' digits)

PENDING = "pending"
MATCHED = "matched"


def new_code() -> str:
    """Six digits (000000-999999) from the CSPRNG."""
    return f"{secrets.randbelow(10**CODE_DIGITS):0{CODE_DIGITS}d}"


def well_formed(code: str) -> bool:
    return _CODE.fullmatch(code) is not None


def code_key(server_secret: bytes) -> bytes:
    """The HMAC key for codes, derived from the server secret (one secret, separate uses)."""
    return hmac.new(server_secret, b"switchboard pairing codes v1", hashlib.sha256).digest()


def digest(key: bytes, code: str) -> str:
    """How a code is stored and looked up: HMAC-SHA256 hex (see the module docstring)."""
    return hmac.new(key, code.encode("ascii"), hashlib.sha256).hexdigest()


@dataclass(frozen=True, slots=True)
class PairingRecord:
    """One code's record. Times are unix milliseconds."""

    book_id: str
    device_id: str  # the generating device
    created_at: int
    expires_at: int
    keep_until: int
    state: str = PENDING
    peer_device_id: str | None = None  # the device that verified it (state matched)
    matched_at: int | None = None


class Outcome(enum.Enum):
    """What a verification of a record at a given time means (``classify``)."""

    CLAIMABLE = "claimable"  # pending, live, another device, the token may act on its book
    UNKNOWN = "unknown"  # no record (never generated, or gone after its 5 minutes)
    USED = "used"  # already matched
    EXPIRED = "expired"
    SELF = "self"  # the generating device verifying its own code
    OTHER_BOOK = "other_book"  # the caller's token is bound to another book


def classify(
    record: PairingRecord | None, device_id: str, now: int, bound_book: str | None
) -> Outcome:
    if record is None or now >= record.keep_until:
        return Outcome.UNKNOWN
    if record.state != PENDING:
        return Outcome.USED
    if now >= record.expires_at:
        return Outcome.EXPIRED
    if record.device_id == device_id:
        return Outcome.SELF
    if bound_book is not None and bound_book != record.book_id:
        return Outcome.OTHER_BOOK
    return Outcome.CLAIMABLE


class CodeStore(Protocol):
    """Where pairing records live, keyed by ``digest(key, code)``: callers pass the code, the
    store hashes it. ``ex``: the caller's transaction, used by the SQL store only."""

    # True when ``mark_matched`` runs inside ``ex``: rolling the transaction back undoes it.
    # Otherwise the caller undoes a match whose follow-up failed with ``unmark``.
    transactional: bool

    async def create(self, code: str, record: PairingRecord) -> bool:
        """Store a new record; False (nothing stored) when a record holds ``code``."""
        ...

    async def get(self, code: str, ex: Executor | None = None) -> PairingRecord | None:
        """The record, or None. One past ``keep_until`` may still be returned until it is swept
        (``classify`` treats it as unknown)."""
        ...

    async def mark_matched(
        self, code: str, peer_device_id: str, now: int, ex: Executor | None = None
    ) -> bool:
        """Swap ``pending`` -> ``matched`` (kept until ``now + LINGER_S``); False if not pending."""
        ...

    async def unmark(self, code: str, peer_device_id: str, record: PairingRecord) -> None:
        """Undo ``mark_matched`` by ``peer_device_id`` (back to ``record``, the pending state)."""
        ...

    async def close(self) -> None: ...


def open_code_store(settings: Settings, db: Database, server_secret: bytes) -> CodeStore:
    """Redis when ``REDIS_URL`` is set (shared by every node), else the SQL store."""
    key = code_key(server_secret)
    if settings.redis_url:
        from shared.pairing.redis import RedisCodeStore

        return RedisCodeStore(
            settings.redis_url, key, prefix=settings.redis_prefix, cluster=settings.redis_cluster
        )
    from shared.pairing.sql import SqlCodeStore

    return SqlCodeStore(db, key)


__all__ = [
    "CODE_DIGITS",
    "LINGER_S",
    "MATCHED",
    "PENDING",
    "CodeStore",
    "Outcome",
    "PairingRecord",
    "classify",
    "code_key",
    "digest",
    "new_code",
    "open_code_store",
    "well_formed",
]
