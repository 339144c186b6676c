"""The outbox table: enqueue in the caller's transaction, then claim / mark rows for the sender.

Rows move ``pending -> sent`` or, after ``MAIL_RETRY_MAX`` attempts, ``pending -> failed``.
A sender owns a row while ``claimed_until`` is in the future; the claim is one conditional
UPDATE whose rowcount says who won, which works the same on SQLite and PostgreSQL and lets
several workers (or nodes) share one outbox without sending a mail twice. A sender that dies
mid-send leaves a claim that simply expires, so delivery is at least once, never lost.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from shared.mail.templates import render
from shared.store.base import Executor

LAST_ERROR_MAX = 500  # characters of the delivery error kept on the row


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True, slots=True)
class OutboxRow:
    id: str
    to_addr: str
    subject: str
    body_text: str
    template: str
    attempts: int

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> OutboxRow:
        return cls(
            id=row["id"],
            to_addr=row["to_addr"],
            subject=row["subject"],
            body_text=row["body_text"],
            template=row["template"],
            attempts=int(row["attempts"]),
        )


def _check_address(to: str) -> str:
    address = to.strip()
    local, at, domain = address.rpartition("@")
    if not (local and at and domain) or any(c in address for c in "\r\n\0<>,; \t"):
        raise ValueError("invalid recipient address")
    return address


async def enqueue_email(ex: Executor, *, to: str, template: str, context: Mapping[str, Any]) -> str:
    """Render ``template`` and queue the mail for ``to``; returns the outbox id.

    ``ex`` may be a transaction: the mail then goes out only if it commits. Call the sender's
    ``wake()`` (``shared.mail.wake_sender``) after the commit to send it at once.
    """
    rendered = render(template, context)
    email_id = uuid.uuid4().hex
    now = now_ms()
    await ex.execute(
        "INSERT INTO outbox (id, to_addr, subject, body_text, template, status, attempts,"
        " next_attempt_at, created_at) VALUES ($1, $2, $3, $4, $5, 'pending', 0, $6, $6)",
        email_id,
        _check_address(to),
        rendered.subject,
        rendered.body,
        template,
        now,
    )
    return email_id


_DUE = (
    "SELECT id, to_addr, subject, body_text, template, attempts FROM outbox"
    " WHERE status = 'pending' AND next_attempt_at <= $1"
    " AND (claimed_until IS NULL OR claimed_until < $1)"
    " ORDER BY next_attempt_at LIMIT $2"
)


async def due(ex: Executor, now: int, limit: int) -> list[OutboxRow]:
    """Pending rows whose attempt is due and that nobody holds (candidates, not yet claimed)."""
    return [OutboxRow.from_row(r) for r in await ex.fetch(_DUE, now, limit)]


async def claim(ex: Executor, email_id: str, now: int, until: int) -> bool:
    """Take the row until ``until``; False when another sender got it (or it is no longer due)."""
    count = await ex.execute(
        "UPDATE outbox SET claimed_until = $1 WHERE id = $2 AND status = 'pending'"
        " AND next_attempt_at <= $3 AND (claimed_until IS NULL OR claimed_until < $3)",
        until,
        email_id,
        now,
    )
    return count == 1


async def next_due(ex: Executor) -> int | None:
    """When the earliest pending row becomes due (unix ms), or None when nothing is pending."""
    value = await ex.fetchval("SELECT min(next_attempt_at) FROM outbox WHERE status = 'pending'")
    return None if value is None else int(value)


async def mark_sent(ex: Executor, email_id: str, now: int) -> None:
    await ex.execute(
        "UPDATE outbox SET status = 'sent', sent_at = $1, attempts = attempts + 1,"
        " claimed_until = NULL, last_error = NULL WHERE id = $2",
        now,
        email_id,
    )


async def mark_retry(ex: Executor, email_id: str, error: str, next_attempt_at: int) -> None:
    await ex.execute(
        "UPDATE outbox SET attempts = attempts + 1, next_attempt_at = $1, claimed_until = NULL,"
        " last_error = $2 WHERE id = $3",
        next_attempt_at,
        error[:LAST_ERROR_MAX],
        email_id,
    )


async def mark_failed(ex: Executor, email_id: str, error: str) -> None:
    await ex.execute(
        "UPDATE outbox SET status = 'failed', attempts = attempts + 1, claimed_until = NULL,"
        " last_error = $1 WHERE id = $2",
        error[:LAST_ERROR_MAX],
        email_id,
    )
