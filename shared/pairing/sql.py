"""``SqlCodeStore``: pairing records in the ``pairing_codes`` table (migration 0006).

The primary key is the code's HMAC digest, so "a record holds this code" is the table's own
uniqueness: two nodes picking the same code at once both try the INSERT and one gets the
conflict. Rows past ``keep_until`` are swept by the next ``create`` (an indexed range delete),
before its INSERT, so an old record never blocks its code for longer than it is kept.

``mark_matched`` runs in the caller's transaction (``transactional``): the verification's join
and audit entry commit with it, or none of them does.
"""

from __future__ import annotations

from typing import Any

from shared.clock import now_ms
from shared.errors import ConflictError
from shared.pairing import LINGER_S, MATCHED, PENDING, CodeStore, PairingRecord, digest
from shared.store.base import Database, Executor, Row

_FIELDS = (
    "book_id, device_id, created_at, expires_at, keep_until, state, peer_device_id, matched_at"
)


def _record(row: Row) -> PairingRecord:
    return PairingRecord(**{name: row[name] for name in _FIELDS.split(", ")})


class SqlCodeStore:
    transactional = True

    def __init__(self, db: Database, key: bytes) -> None:
        self._db = db
        self._key = key

    async def create(self, code: str, record: PairingRecord) -> bool:
        db = self._db
        await db.execute("DELETE FROM pairing_codes WHERE keep_until <= $1", now_ms())
        values: tuple[Any, ...] = (
            digest(self._key, code),
            record.book_id,
            record.device_id,
            record.created_at,
            record.expires_at,
            record.keep_until,
            record.state,
        )
        try:
            await db.execute(
                "INSERT INTO pairing_codes (code_hash, book_id, device_id, created_at, expires_at,"
                " keep_until, state) VALUES ($1, $2, $3, $4, $5, $6, $7)",
                *values,
            )
        except ConflictError:
            return False
        return True

    async def get(self, code: str, ex: Executor | None = None) -> PairingRecord | None:
        row = await (ex or self._db).fetchrow(
            f"SELECT {_FIELDS} FROM pairing_codes WHERE code_hash = $1", digest(self._key, code)
        )
        return None if row is None else _record(row)

    async def mark_matched(
        self, code: str, peer_device_id: str, now: int, ex: Executor | None = None
    ) -> bool:
        changed = await (ex or self._db).execute(
            "UPDATE pairing_codes SET state = $2, peer_device_id = $3, matched_at = $4,"
            " keep_until = $5 WHERE code_hash = $1 AND state = $6",
            digest(self._key, code),
            MATCHED,
            peer_device_id,
            now,
            now + LINGER_S * 1000,
            PENDING,
        )
        return changed == 1

    async def unmark(self, code: str, peer_device_id: str, record: PairingRecord) -> None:
        """Only for a match made outside a transaction (``ex`` None); otherwise roll back."""
        await self._db.execute(
            "UPDATE pairing_codes SET state = $3, peer_device_id = NULL, matched_at = NULL,"
            " keep_until = $4 WHERE code_hash = $1 AND state = $5 AND peer_device_id = $2",
            digest(self._key, code),
            peer_device_id,
            PENDING,
            record.keep_until,
            MATCHED,
        )

    async def close(self) -> None:
        return None  # the database belongs to the services


_: type[CodeStore] = SqlCodeStore
