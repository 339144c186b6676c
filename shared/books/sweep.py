"""Abandoned direct photo uploads: a ``pending`` photo whose upload URL expired long ago.

``POST /photos/upload`` with a JSON body claims a row and hands out a 5-minute upload URL; a
client that never calls ``/complete`` would leave the row (and maybe an object) forever. The book
relay's prune pass (``BOOK_PRUNE_INTERVAL_S``) drops those older than ``ABANDONED_AFTER_MS``:
the object first, then the row, so a failure is retried on the next pass.
"""

from __future__ import annotations

from shared.blobs.base import BlobStore
from shared.store.base import Executor

ABANDONED_AFTER_MS = 3600 * 1000  # twelve times the longest upload URL (BLOB_URL_TTL_S <= 300)


async def abandoned_photos(db: Executor, blobs: BlobStore, *, now_ms: int) -> int:
    rows = await db.fetch(
        "SELECT id, blob_key FROM photos WHERE state = 'pending' AND created_at < $1 LIMIT 1000",
        now_ms - ABANDONED_AFTER_MS,
    )
    for row in rows:
        await blobs.delete(row["blob_key"])
        await db.execute("DELETE FROM photos WHERE id = $1 AND state = 'pending'", row["id"])
    return len(rows)
