"""Close the sockets of revoked credentials, on every node (``shared.revocation`` notices).

The hub listens on the node-wide ``revoke`` channel; a notice closes every matching socket of
this node with 1008 (policy: the credential was revoked), found through the registry's token,
session and user indexes.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

from shared.codes import CloseCode
from shared.revocation import REVOKE_CHANNEL, forget_cached_token

if TYPE_CHECKING:
    from relay.connection import WsConnection
    from relay.state import RelayState

log = logging.getLogger("switchboard.revocation")


def matches(conn: WsConnection, notice: dict[str, Any]) -> bool:
    p = conn.principal
    if "token" in notice:
        return p.token_id is not None and p.token_id == notice["token"]
    if "session" in notice:
        return p.session_id is not None and p.session_id == notice["session"]
    if "user_sessions" in notice:
        return (
            p.kind == "user"
            and p.user_id == notice["user_sessions"]
            and p.session_id is not None
            and p.session_id != notice.get("keep")
        )
    return False


def candidates(state: RelayState, notice: dict[str, Any]) -> tuple[WsConnection, ...]:
    """The sockets a notice may concern, from the registry's indexes (never a walk of them all)."""
    registry = state.registry
    for key, lookup in (
        ("token", registry.by_token),
        ("session", registry.by_session),
        ("user_sessions", registry.by_user),
    ):
        value = notice.get(key)
        if isinstance(value, str):
            return lookup(value)
    return ()


async def install(state: RelayState) -> None:
    """Listen for notices (awaited at start: the subscription is confirmed before serving)."""

    def on_notice(data: bytes) -> None:
        try:
            notice = json.loads(data)
        except ValueError:
            log.error("dropped a malformed revocation notice")
            return
        if not isinstance(notice, dict):
            return
        if isinstance(notice.get("token"), str):
            forget_cached_token(state.services, notice["token"])
        for conn in candidates(state, notice):
            if conn.open and matches(conn, notice):
                conn.close(CloseCode.POLICY, "credential revoked")

    await state.hub.listen(REVOKE_CHANNEL, on_notice)


__all__ = ["candidates", "install", "matches"]
