"""Revocation notices: REST revokes a credential, every node closes the sockets opened with it.

realtime.md guarantee 4: "a revoked token is disconnected within 1 s on every node". Every node
listens on one broker channel (``REVOKE_CHANNEL``, see ``relay.revocation``); a notice is a small
JSON object naming what died:

* ``{"token": id}``: an API token (DELETE /tokens/{id}, POST /tokens/revoke);
* ``{"session": id}``: one login session, and the access JWTs carrying it (logout, refresh reuse,
  DELETE /auth/sessions/{id});
* ``{"user_sessions": user_id, "keep": session_id | null}``: every session of a user but one
  (password change keeps the caller's, password reset keeps none);
* ``{"book_device": [book_id, device_id]}``: a device removed from a book (DELETE
  /books/{book_id}/devices/{device_id}): its ``/ws/relay/{book_id}`` sockets get
  ``{"type": "device.removed"}``, then close 1008; its sockets on other books stay open.

The notice goes out after the revocation committed. If the broker is down it is logged and lost;
the sockets then live on until their credential's next check (refresh or expiry), which is why
REST checks the session on every request and does not rely on this.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from typing import Any

from shared.errors import BackendUnavailable
from shared.services import Services

log = logging.getLogger("switchboard.revocation")

REVOKE_CHANNEL = "revoke"


async def announce(services: Services, notices: Iterable[dict[str, Any]]) -> None:
    for notice in notices:
        try:
            await services.broker.publish(REVOKE_CHANNEL, json.dumps(notice).encode())
        except BackendUnavailable as exc:
            log.error("could not announce a revocation: %s", exc)


def forget_cached_token(services: Services, token_id: str) -> None:
    """Drop this process's cached lookup of an API token (api.authn caches them briefly)."""
    forget = getattr(services.authenticator, "forget_token", None)
    if forget is not None:
        forget(token_id)


async def tokens_revoked(services: Services, token_ids: Iterable[str]) -> None:
    ids = list(token_ids)
    for token_id in ids:  # here at once; the other processes when the notice reaches them
        forget_cached_token(services, token_id)
    await announce(services, ({"token": t} for t in ids))


async def session_revoked(services: Services, session_id: str) -> None:
    await announce(services, [{"session": session_id}])


async def user_sessions_revoked(services: Services, user_id: str, keep: str | None = None) -> None:
    await announce(services, [{"user_sessions": user_id, "keep": keep}])


async def book_device_removed(services: Services, book_id: str, device_id: str) -> None:
    await announce(services, [{"book_device": [book_id, device_id]}])


__all__ = [
    "REVOKE_CHANNEL",
    "announce",
    "book_device_removed",
    "session_revoked",
    "tokens_revoked",
    "user_sessions_revoked",
]
