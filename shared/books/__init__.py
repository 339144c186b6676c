"""Home Pocket books: membership, the per-book op history, snapshots (shared by relay and api)."""

from __future__ import annotations

from shared.store.base import Executor


async def is_member(db: Executor, book_id: str, device_id: str) -> bool:
    """A current member (an unknown book is simply not a book the device belongs to)."""
    found = await db.fetchval(
        "SELECT 1 FROM book_members WHERE book_id = $1 AND device_id = $2 AND removed_at IS NULL",
        book_id,
        device_id,
    )
    return found is not None
