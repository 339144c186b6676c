"""The audit log: auth, token, book and pairing events, kept 90 days, exportable by the user.

IP addresses and subjects (an email that failed to log in, a token or device id) are stored as
``hash_id`` digests, never raw; ``details`` holds only non-secret context (a session id, scope
names, a reason). Events recorded by the account and token routes:

``auth.register``, ``auth.login``, ``auth.login_failed``, ``auth.refresh_reused``,
``auth.logout``, ``auth.session_revoked``, ``auth.password_changed``,
``auth.password_reset_requested``, ``auth.password_reset``, ``auth.email_verified``,
``token.created``, ``token.updated``, ``token.revoked``; and for Home Pocket books (``subject`` a
device id, ids in ``details`` hashed too): ``book.device_removed``, ``book.tier_changed``,
``pairing.generated``, ``pairing.verified``, ``pairing.verify_failed``, ``pairing.exchanged``,
``photo.deleted``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from shared.clock import now_ms
from shared.secrets import hash_id
from shared.store.base import Executor

RETENTION_DAYS = 90
_DAY_MS = 86_400_000


async def record(
    ex: Executor,
    *,
    user_id: str | None,
    event: str,
    ip: str | None = None,
    subject: str | None = None,
    details: Mapping[str, Any] | None = None,
) -> None:
    """Append one entry; pass the caller's transaction so the entry commits with the change."""
    await ex.execute(
        "INSERT INTO audit_log (user_id, event, subject_hash, ip_hash, details, created_at)"
        " VALUES ($1, $2, $3, $4, $5, $6)",
        user_id,
        event,
        hash_id(subject) if subject is not None else None,
        hash_id(ip) if ip is not None else None,
        json.dumps(dict(details or {}), separators=(",", ":")),
        now_ms(),
    )


async def prune(db: Executor, older_than_days: int = RETENTION_DAYS) -> int:
    """Delete entries older than ``older_than_days``; returns how many went."""
    return await db.execute(
        "DELETE FROM audit_log WHERE created_at < $1", now_ms() - older_than_days * _DAY_MS
    )
