"""Idempotent requests: a repeated key from the same caller gets the first reply again.

Used by ``POST /publish`` (``idempotency_key``) and by ``/ws`` requests (``request_id``,
realtime.md "A repeated request_id from the same principal returns the first reply again").

A key is *claimed* before the work runs (``claim``): one row ``(scope, key)`` with no reply yet.
Whoever inserts the row owns the request; a repeat finds the row and either gets the stored
reply or, while the first attempt still runs, ``InProgress``. The reply is written by ``finish``,
or better in the same transaction as the work itself (``reply_statement``, e.g. as an inbox
entry's ``also``), so "work done" and "reply remembered" can never disagree. A claim whose owner
died (no reply after ``CLAIM_TIMEOUT_MS``) may be taken over; a key older than its TTL is free
again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from shared.store.base import Executor

CLAIM_TIMEOUT_MS = 60_000
MAX_KEY = 128


class InProgress(Exception):
    """The first request with this key has not answered yet."""


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    body: Any


async def claim(db: Executor, scope: str, key: str, *, now: int, ttl_ms: int) -> Reply | None:
    """None: the caller owns ``key`` and must ``finish`` (or ``release``) it. Else the first reply.

    Raises ``InProgress`` while another attempt holds a fresh claim.
    """
    for _ in range(3):  # a row can vanish (release) or age out between the statements: look again
        inserted = await db.execute(
            "INSERT INTO idempotency_keys (scope, key, reply, status, created_at) VALUES ($1, $2, NULL, NULL, $3)"
            " ON CONFLICT (scope, key) DO NOTHING",
            scope,
            key,
            now,
        )
        if inserted:
            return None
        row = await db.fetchrow(
            "SELECT reply, status, created_at FROM idempotency_keys WHERE scope = $1 AND key = $2",
            scope,
            key,
        )
        if row is None:
            continue
        created = int(row["created_at"])
        expired = created < now - ttl_ms
        if row["reply"] is not None and not expired:
            return Reply(int(row["status"] or 200), json.loads(row["reply"]))
        if expired or created < now - CLAIM_TIMEOUT_MS:
            # Take the key over, but only if nobody else did meanwhile (compare-and-set on the row).
            taken = await db.execute(
                "UPDATE idempotency_keys SET reply = NULL, status = NULL, created_at = $3"
                " WHERE scope = $1 AND key = $2 AND created_at = $4",
                scope,
                key,
                now,
                created,
            )
            if taken:
                return None
            continue
        raise InProgress(key)
    raise InProgress(key)


def reply_statement(scope: str, key: str, status: int, body: Any) -> tuple[str, tuple[Any, ...]]:
    """The UPDATE that stores the reply: run it in the work's own transaction."""
    return (
        "UPDATE idempotency_keys SET reply = $3, status = $4 WHERE scope = $1 AND key = $2",
        (scope, key, json.dumps(body, separators=(",", ":")), status),
    )


async def finish(db: Executor, scope: str, key: str, status: int, body: Any) -> None:
    sql, args = reply_statement(scope, key, status, body)
    await db.execute(sql, *args)


async def release(db: Executor, scope: str, key: str) -> None:
    """The work failed before it took effect: a retry with the same key may run it."""
    await db.execute(
        "DELETE FROM idempotency_keys WHERE scope = $1 AND key = $2 AND reply IS NULL", scope, key
    )


async def prune(db: Executor, *, now: int, ttl_ms: int) -> int:
    return await db.execute("DELETE FROM idempotency_keys WHERE created_at < $1", now - ttl_ms)


__all__ = ["InProgress", "Reply", "claim", "finish", "prune", "release", "reply_statement"]
